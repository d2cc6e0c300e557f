"""Original checkpoints load strictly, whatever wrapper and prefix they carry."""

import pytest
import torch

from droppos import load_original_checkpoint
from tests.helpers import tiny_droppos

BLOCK = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


def original_names(depth, decoder_depth, mae_branch=False, mae_depth=8):
    """The key set of an original DropPos checkpoint, written out name by name."""

    def linear(prefix):
        return [f"{prefix}.weight", f"{prefix}.bias"]

    def blocks(prefix, count):
        return [n for i in range(count) for part in BLOCK for n in linear(f"{prefix}.{i}.{part}")]

    names = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"]
    names += ["mask_pos_token", *blocks("blocks", depth), *linear("norm")]
    names += linear("decoder_embed") + blocks("decoder_blocks", decoder_depth)
    names += linear("decoder_norm") + linear("decoder_pred")
    if mae_branch:
        names += [*linear("aux_decoder_embed"), "aux_decoder_pos_embed", "mask_token"]
        names += blocks("aux_decoder_blocks", mae_depth)
        names += linear("aux_decoder_norm") + linear("aux_decoder_pred")
    return set(names)


@pytest.mark.parametrize("decoder_depth", [2, 8])
@pytest.mark.parametrize("mae_branch", [False, True])
def test_state_dict_names_are_the_original_ones(decoder_depth, mae_branch):
    model = tiny_droppos(decoder_depth=decoder_depth, pixel_branch=mae_branch)
    assert set(model.state_dict()) == original_names(2, decoder_depth, mae_branch)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_original_checkpoint_files_load_strictly(tmp_path, wrapper, prefix):
    source = tiny_droppos(decoder_depth=8, pixel_branch=True)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    path = tmp_path / "checkpoint-799.pth"
    torch.save({wrapper: state, "epoch": 799} if wrapper else state, path)

    target = tiny_droppos(decoder_depth=8, pixel_branch=True)
    load_original_checkpoint(target, path)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_a_mismatched_configuration_is_named_in_the_error():
    source = tiny_droppos(decoder_depth=8)
    with pytest.raises(ValueError, match=r"not in model: decoder_blocks\.2"):
        load_original_checkpoint(tiny_droppos(decoder_depth=2), {"model": source.state_dict()})
    with pytest.raises(ValueError, match="missing from file: aux_decoder"):
        load_original_checkpoint(
            tiny_droppos(decoder_depth=8, pixel_branch=True), source.state_dict()
        )


def test_the_loaded_model_gives_the_same_loss(images):
    source = tiny_droppos()
    target = tiny_droppos()
    load_original_checkpoint(target, {"state_dict": source.state_dict()})
    noise = torch.rand(3, 64), torch.rand(3, 16)
    assert torch.equal(
        source(images, patch_noise=noise[0], position_noise=noise[1]).loss,
        target(images, patch_noise=noise[0], position_noise=noise[1]).loss,
    )


def test_a_droppos_0_1_checkpoint_reads_as_a_backbone_through_the_schema(tmp_path):
    """The first release's layout (`model_name` beside its `config`, no header) still reads:
    heads and image size from its config, mean and std from its data section."""
    from droppos.interop.backbone import load_backbone

    model = tiny_droppos()
    path = tmp_path / "old.pth"
    config = {"model": {"num_heads": 4, "img_size": 32}, "data": {"mean": [0.5] * 3}}
    torch.save(
        {"model": model.state_dict(), "model_name": "droppos_vit_tiny", "config": config}, path
    )
    backbone = load_backbone(path)
    assert backbone.kind == "droppos pre-training checkpoint (droppos_vit_tiny)"
    assert (backbone.encoder.num_heads, backbone.encoder.img_size) == (4, 32)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std is None
    assert torch.equal(backbone.state["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
