"""Export: timm loads the encoder with no missing keys but the head, and computes the same
features; Detectron2/MMSegmentation files carry the same weights under their names (MMSegmentation
itself loads its file in test_mmseg_export.py)."""

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from droppos import create_model
from droppos.cli.main import main
from droppos.interop import export as export_module
from droppos.interop import formats
from droppos.interop.backbone import build_vit, load_backbone
from droppos.interop.formats import mmseg_state
from droppos.methods import pretrained_model

TOLERANCE = dict(rtol=0, atol=1e-5)  # fp32, as the issue asks
BLOCK_PARTS = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    """train/ and val/ of 16 and 8 random 20x20 greyscale images in two classes."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("val", 8)):
        for i in range(count):
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(20, 20, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


SHAPE = [
    "--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
    "--model.encoder.in_chans", "1", "--model.encoder.embed_dim", "32",
    "--model.encoder.depth", "2", "--model.encoder.num_heads", "2",
]  # fmt: skip
QUIET = [
    "--data.num_workers", "0", "--run.progress", "false", "--run.tensorboard", "false",
    "--run.precision", "fp32",
]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, grey_folder):
    """A droppos pre-training checkpoint of a 32-wide greyscale ViT (non-standard everything)."""
    out = tmp_path_factory.mktemp("pretrain")
    args = ["pretrain", *SHAPE, "--model.decoder_embed_dim", "32", "--model.decoder_num_heads", "2"]
    args += ["--data.source", str(grey_folder), "--optim.epochs", "1", "--optim.batch_size", "4"]
    assert main([*args, "--run.output_dir", str(out), *QUIET]) == 0
    return out / "last.pth"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, grey_folder, pretrained):
    out = tmp_path_factory.mktemp("finetune")
    args = ["finetune", "--model.checkpoint", str(pretrained), "--data.source", str(grey_folder)]
    args += ["--optim.epochs", "1", "--optim.warmup_epochs", "0", "--optim.batch_size", "4"]
    assert main([*args, "--run.output_dir", str(out), *QUIET]) == 0
    return out / "best.pth"


def export(checkpoint, folder, *extra):
    assert (
        main(
            [
                "export",
                "--model.checkpoint",
                str(checkpoint),
                "--run.output_dir",
                str(folder),
                *extra,
            ]
        )
        == 0
    )
    return json.loads((folder / "config.json").read_text())


def droppos_encoder(checkpoint):
    """The pre-training model as droppos itself builds it, with the checkpoint's weights."""
    return pretrained_model(checkpoint)[1].eval()


def test_timm_loads_the_export_with_no_missing_keys_but_the_head(tmp_path, pretrained):
    config = export(pretrained, tmp_path)
    weights = tmp_path / "model.safetensors"
    args = dict(config["model_args"], num_classes=10)
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights)),
        **args,
    ).eval()
    fresh = timm.create_model(config["architecture"], pretrained=False, **args)
    result = fresh.load_state_dict(load_file(str(weights)), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []

    images = torch.randn(3, 1, 16, 16)
    ours = droppos_encoder(pretrained)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), ours.forward_features(images), **TOLERANCE
        )


def test_the_exported_folder_is_a_timm_local_dir_model(tmp_path, pretrained):
    config = export(pretrained, tmp_path)
    assert config["architecture"] == "vit_tiny_patch16_224"  # nearest width; args are exact
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16]
    assert config["pretrained_cfg"]["mean"] == [0.5]
    source = config["droppos"]
    assert (
        source["source_checkpoint"] == str(pretrained.resolve())
        and len(source["source_sha256"]) == 64
    )
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=0).eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # the feature droppos measures by default: the mean patch token
        expected = droppos_encoder(pretrained).forward_features(images)[:, 1:].mean(dim=1)
        torch.testing.assert_close(model(images), expected, **TOLERANCE)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 16, 16) and data["interpolation"] == "bicubic"


def test_a_finetuned_checkpoint_exports_its_classifier(tmp_path, finetuned):
    config = export(finetuned, tmp_path)
    assert config["num_classes"] == 2 and config["global_pool"] == "avg"
    assert config["label_names"] == ["a", "b"]
    state = load_file(str(tmp_path / "model.safetensors"))
    assert {"fc_norm.weight", "head.weight"} <= set(state) and "norm.weight" not in state
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    reference = build_vit(load_backbone(finetuned), num_classes=2, global_pool="avg").eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), **TOLERANCE)


def test_detectron2_and_mmsegmentation_files_hold_the_same_weights(tmp_path, pretrained):
    export(pretrained, tmp_path)
    timm_state = load_file(str(tmp_path / "model.safetensors"))
    mae = torch.load(tmp_path / "mae_format.pth", weights_only=True)
    assert set(mae) == {"model"}  # MAE's release layout: ViTDet's init_checkpoint reads it
    assert mae["model"].keys() == timm_state.keys()
    for name, value in timm_state.items():
        assert torch.equal(mae["model"][name], value)

    mmseg = torch.load(tmp_path / "mmseg_mae.pth", weights_only=True)
    expected = {"cls_token", "pos_embed", "patch_embed.projection.weight"}
    expected |= {"patch_embed.projection.bias"}
    mmseg_parts = ["ln1", "attn.qkv", "attn.proj", "ln2", "ffn.layers.0.0", "ffn.layers.1"]
    for i in range(2):
        for part in mmseg_parts:
            expected |= {f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"}
    assert set(mmseg) == expected  # its MAEAttention keeps timm's fused qkv bias
    assert torch.equal(
        mmseg["layers.1.ffn.layers.0.0.weight"], timm_state["blocks.1.mlp.fc1.weight"]
    )
    assert torch.equal(mmseg["layers.0.ln2.bias"], timm_state["blocks.0.norm2.bias"])
    assert torch.equal(mmseg["layers.1.attn.qkv.bias"], timm_state["blocks.1.attn.qkv.bias"])


def test_original_checkpoints_export_without_their_decoders(tmp_path):
    source = create_model("droppos_vit_small_patch16", img_size=32, depth=2, pixel_branch=True)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": state, "epoch": 799}, path)
    config = export(path, tmp_path / "out")
    assert config["architecture"] == "vit_small_patch16_224"
    assert config["model_args"]["num_heads"] == 6 and config["model_args"]["img_size"] == [32, 32]
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith(("decoder", "aux_", "mask_")) for k in exported)
    images = torch.randn(2, 3, 32, 32)
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), source.eval().forward_features(images), **TOLERANCE
        )


def test_mmseg_names_follow_beit2mmseg():
    state = {k: torch.zeros(1) for k in ("blocks.3.mlp.fc2.weight", "norm.weight", "head.bias")}
    assert set(mmseg_state(state)) == {"layers.3.ffn.layers.1.weight"}


@pytest.mark.parametrize(
    "checkpoint, extra, message",
    [
        ("random", (), "needs a checkpoint file"),
        ("/no/such/file.pth", (), "no checkpoint at"),
        (None, ("--model.timm_name", "resnet50"), "not a timm VisionTransformer"),
        (  # a pre-norm CLIP ViT: timm would leave its norm_pre at init
            None,
            ("--model.timm_name", "vit_base_patch16_clip_224"),
            "model.safetensors would not load fully into timm's vit_base_patch16_clip_224",
        ),
        (None, ("--model.timm_name", "vit_base_r26_s32_224"), "timm cannot build"),  # a hybrid
    ],
)
def test_export_mistakes_exit_2_with_one_line(
    tmp_path, pretrained, capsys, checkpoint, extra, message
):
    args = [
        "export",
        "--model.checkpoint",
        str(checkpoint or pretrained),
        "--run.output_dir",
        str(tmp_path),
    ]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def drift_mmseg(monkeypatch):
    renames = [(p, r.replace("ln1", "norm1")) for p, r in formats.MMSEG_RENAMES]
    monkeypatch.setattr(formats, "MMSEG_RENAMES", tuple(renames))


def drift_hf(monkeypatch):
    renames = [(p, r.replace("layernorm_before", "layernorm_pre")) for p, r in formats.HF_RENAMES]
    monkeypatch.setattr(formats, "HF_RENAMES", tuple(renames))


def drift_mae(monkeypatch):
    leaky = {"mask_pos_token": torch.zeros(1, 1, 32)}  # a pre-training tensor let through
    monkeypatch.setattr(export_module, "mae_state", lambda state: {"model": {**state, **leaky}})


@pytest.mark.parametrize(
    "drift, file, named",
    [
        (drift_mmseg, "mmseg_mae.pth", "missing from file: layers.0.ln1.bias"),
        (drift_hf, "hf/model.safetensors", "not in model: encoder.layer.0.layernorm_pre.bias"),
        (drift_mae, "mae_format.pth", "not in model: mask_pos_token"),
    ],
)
def test_a_file_drifting_from_its_client_fails_export_in_one_line_writing_nothing(
    tmp_path, pretrained, capsys, monkeypatch, drift, file, named
):
    drift(monkeypatch)
    args = ["export", "--model.checkpoint", str(pretrained), "--run.output_dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{file} would not load fully into" in err and named in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "pool, fc_norm, classes", [("avg", False, 0), ("avg", True, 3), ("token", False, 3)]
)
def test_the_mae_layout_is_timms_plain_vit(pool, fc_norm, classes):
    """MAE's `models_vit` is timm's VisionTransformer (with `fc_norm` for a pooled head): the
    names export checks mae_format.pth against are those."""
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    args |= dict(mlp_ratio=4.0, global_pool=pool, fc_norm=fc_norm, num_classes=classes)
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", **args)
    assert formats.mae_keys(args) == set(model.state_dict())


def test_the_hf_folder_loads_offline_into_transformers_with_the_same_features(
    tmp_path, pretrained, monkeypatch
):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export(pretrained, tmp_path)
    model, info = transformers.ViTModel.from_pretrained(
        tmp_path / "hf", add_pooling_layer=False, output_loading_info=True
    )
    assert not_loaded(info) == {}  # export's own check of hf/ agrees with transformers
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        theirs = model.eval()(pixel_values=images).last_hidden_state
        ours = droppos_encoder(pretrained).forward_features(images)
    torch.testing.assert_close(theirs, ours, **TOLERANCE)


def test_a_cls_pooled_classifier_loads_as_a_hf_vit_for_image_classification(
    tmp_path, grey_folder, pretrained, monkeypatch, capsys
):
    """`--model.global_pool token` heads read [CLS] through the final norm, as transformers'
    ViT classifier does: its logits equal droppos's; the default mean-token head says why it
    is not there."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "finetune"
    args = ["finetune", "--model.checkpoint", str(pretrained), "--data.source", str(grey_folder)]
    args += ["--optim.epochs", "1", "--optim.warmup_epochs", "0", "--optim.batch_size", "4"]
    args += ["--model.global_pool", "token", "--run.output_dir", str(out), *QUIET]
    assert main(args) == 0
    export(out / "best.pth", tmp_path / "export")
    assert "ViTForImageClassification.from_pretrained" in capsys.readouterr().out
    hf, info = transformers.ViTForImageClassification.from_pretrained(
        tmp_path / "export" / "hf", output_loading_info=True
    )
    assert not_loaded(info) == {}
    assert hf.config.id2label == {0: "a", 1: "b"}
    reference = build_vit(load_backbone(out / "best.pth"), num_classes=2, global_pool="token")
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        theirs = hf.eval()(pixel_values=images).logits
        torch.testing.assert_close(theirs, reference.eval()(images), **TOLERANCE)


def test_a_mean_token_classifier_exports_its_encoder_to_hf_and_says_so(tmp_path, finetuned, capsys):
    export(finetuned, tmp_path)
    said = capsys.readouterr().out
    assert "holds the encoder only" in said and "--model.global_pool token" in said
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "ViTModel"
    ]
    transformers = pytest.importorskip("transformers")
    _, info = transformers.ViTModel.from_pretrained(
        tmp_path / "hf", add_pooling_layer=False, output_loading_info=True
    )  # an fc_norm head's encoder has no final norm: transformers starts its own
    assert not_loaded(info) == {"missing_keys": ["layernorm.bias", "layernorm.weight"]}


def not_loaded(info: dict) -> dict:
    """What `from_pretrained(..., output_loading_info=True)` says it did not load."""
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    return {kind: sorted(map(str, info[kind])) for kind in kinds if info[kind]}


def test_a_hugging_face_folder_is_a_checkpoint_every_command_reads(tmp_path, pretrained):
    export(pretrained, tmp_path)
    ours, theirs = load_backbone(pretrained), load_backbone(tmp_path / "hf")
    assert theirs.kind == "Hugging Face ViTModel" and theirs.encoder == ours.encoder
    assert all(torch.equal(ours.state[k], theirs.state[k]) for k in theirs.state)
    assert set(theirs.state) == {k for k in ours.state if not k.startswith(("head.", "fc_norm."))}


def test_a_locally_saved_vitmae_folder_loads_as_an_encoder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4, num_channels=1,
    )  # fmt: skip
    mae = transformers.ViTMAEForPreTraining(config)
    mae.save_pretrained(tmp_path / "mae")
    backbone = load_backbone(tmp_path / "mae")
    assert backbone.kind == "Hugging Face ViTMAEModel"
    assert (backbone.encoder.depth, backbone.encoder.embed_dim, backbone.encoder.mlp_ratio) == (
        2, 32, 2.0,
    )  # fmt: skip
    saved = load_file(str(tmp_path / "mae" / "model.safetensors"))  # Hugging Face's names
    prefix = "vit.encoder.layer.1.attention.attention"
    expected = torch.cat([saved[f"{prefix}.{part}.weight"] for part in ("query", "key", "value")])
    torch.testing.assert_close(backbone.state["blocks.1.attn.qkv.weight"], expected)
    assert not any(k.startswith("decoder") for k in backbone.state)
    out = tmp_path / "knn"
    assert main(["knn", "--model.checkpoint", str(tmp_path / "mae"), "--run.output_dir",
                 str(out), "--run.progress", "false"]) == 0  # fmt: skip
