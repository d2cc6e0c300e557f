"""Location awareness, measured and shown: position probe, order sensitivity, jigsaw pictures."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from droppos.cli.main import main
from droppos.engine.context import RunContext
from droppos.evaluation.datasets import EvalDataSection
from droppos.evaluation.order_sensitivity import condition_logits
from droppos.evaluation.position_probe import (
    PatchFeatures,
    PositionProbeSection,
    position_scores,
    probed_patch_features,
    train_position_probe,
)
from droppos.visual.jigsaw import (
    ERROR_KEY,
    FRAME,
    HIDDEN,
    KEPT,
    NEXT_BEST,
    STATES,
    JigsawView,
    assign_cells,
    draw_jigsaw,
    heat,
    heat_levels,
    place_patches,
    to_patches,
)

GRID, L = (4, 4), 16
QUIET = ["--data.num_workers", "0", "--run.progress", "false"]


def results(folder):
    return json.loads((folder / "results.json").read_text())


def tiny_vit(**overrides):
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return timm.create_model("vit_tiny_patch16_224", **{**options, **overrides}).eval()


def test_an_oracle_feature_scores_100_and_a_random_backbone_scores_chance():
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(L).repeat(200)
    oracle = torch.nn.functional.one_hot(positions, L).float()
    oracle += 0.01 * torch.randn(oracle.shape, generator=generator)
    split = PatchFeatures(oracle, positions)
    section = PositionProbeSection(epochs=20, batch_size=256, lr=1e-2)
    assert train_position_probe(split, split, L, GRID, section, seed=0)["top1"] == 100.0

    # A random ViT on noise images, every position dropped: nothing tells the cells apart.
    vit = tiny_vit()
    images = torch.randn(120, 3, 32, 32, generator=generator)
    dataset = list(zip(images, torch.zeros(120, dtype=torch.long)))
    data = EvalDataSection(batch_size=30, num_workers=0)
    train = probed_patch_features(vit, dataset[:90], 1.0, 0, data, RunContext.local())
    val = probed_patch_features(vit, dataset[90:], 1.0, 1, data, RunContext.local())
    assert len(train.positions) == 90 * L  # ratio 1: every patch probed
    scores = train_position_probe(train, val, L, GRID, section, seed=0)
    assert scores["top1"] < 2 * 100 / L  # chance is 6.25%


def test_position_scores_count_neighbours_and_error_distances():
    positions = torch.tensor([0, 5, 10, 15])
    predicted = torch.tensor([0, 6, 0, 15])  # right, one cell off, far off, right
    logits = torch.nn.functional.one_hot(predicted, L).float()
    scores = position_scores(logits, positions, GRID)
    assert scores["top1"] == 50.0 and scores["within_one_cell"] == 75.0
    assert scores["mean_error_distance"] == pytest.approx((1 + math.sqrt(8)) / 2)


def test_the_jigsaw_of_an_oracle_prediction_is_the_input():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    patches = to_patches(image, 8)
    visible = np.random.default_rng(1).permutation(L)  # every patch, in random order
    logits = torch.nn.functional.one_hot(torch.as_tensor(visible), L).float() * 10
    cells = assign_cells(logits).numpy()
    assert np.array_equal(place_patches(patches, visible, cells, GRID), image)


def test_shuffling_patches_matters_only_to_a_model_with_positions():
    images = torch.randn(4, 3, 32, 32)
    with_positions = tiny_vit(num_classes=5)
    without = tiny_vit(num_classes=5)
    with torch.no_grad():
        without.load_state_dict(with_positions.state_dict())
        without.pos_embed.zero_()
    for model, changes in ((without, False), (with_positions, True)):
        intact = condition_logits(model, images, "intact", torch.Generator().manual_seed(0))
        shuffled = condition_logits(
            model, images, "shuffled_patches", torch.Generator().manual_seed(0)
        )
        assert torch.allclose(intact, shuffled, atol=1e-5) != changes


def drawn(view: JigsawView) -> np.ndarray:
    """The one picture of a black 32x32 image (a dark background everywhere) under `view`."""
    images = torch.zeros(1, 1, 32, 32)
    (picture,) = draw_jigsaw(images, view, (0.0,), (1.0,))
    return np.asarray(picture.convert("RGB"))


def has(pixels: np.ndarray, colour: np.ndarray) -> bool:
    """Whether `colour` fills a 4x4 block somewhere (a swatch or a frame's corner, not a pixel
    of a letter's anti-aliased edge)."""
    same = (pixels == colour).all(axis=-1)
    blocks = same[:-3, :-3] & same[1:-2, 1:-2] & same[2:-1, 2:-1] & same[3:, 3:]
    blocks &= same[:-3, 3:] & same[3:, :-3]
    return bool(blocks.any())


def test_hidden_patches_stand_out_from_a_black_background():
    assert HIDDEN.min() > 100 and HIDDEN.max() - HIDDEN.min() > 60  # bright, and not a grey


def test_two_patches_claiming_one_cell_are_both_drawn_and_the_move_is_marked():
    visible = torch.tensor([[0, 5, 10]])
    logits = torch.full((1, 3, L), -10.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 10] = 9.0, 5.0, 9.0  # 0 and 5 claim cell 0
    view = JigsawView(GRID, 8, visible, torch.tensor([[True, True, False]]), logits,
                      torch.full((1, L), 1 / L))  # fmt: skip
    pixels = drawn(view)
    panel3 = pixels[24 : 24 + 192, 8 + 2 * 200 : 8 + 2 * 200 + 192]  # 32 px drawn 6x, 8 apart
    assert has(panel3, NEXT_BEST)  # the patch that lost its cell is framed where it went
    key = pixels[24 + 192 :]
    for colour in (FRAME, KEPT, HIDDEN, NEXT_BEST):
        assert has(key, colour), colour


def test_a_yes_no_map_gets_two_colours_and_only_the_keys_that_apply():
    every = torch.arange(L)[None]
    view = JigsawView(GRID, 8, every, torch.ones(1, L, dtype=torch.bool),
                      torch.nn.functional.one_hot(every, L).float() * 10,
                      (torch.arange(L)[None] % 2).float(),
                      heat_states=("not in the context", "in the context"))  # fmt: skip
    pixels = drawn(view)
    heat_panel = pixels[24 : 24 + 192, -8 - 192 : -8]
    colours = {tuple(c) for c in heat_panel.reshape(-1, 3)}
    assert colours == {tuple(STATES[0]), tuple(STATES[1])}  # no continuous scale
    key = pixels[24 + 192 :]
    assert has(key, STATES[0]) and has(key, STATES[1])
    for colour in (FRAME, KEPT, HIDDEN, NEXT_BEST):  # every position dropped, every patch seen
        assert not has(key, colour), colour


@pytest.mark.slow  # an edge of the picture schedule: a whole pre-training
def test_a_run_shorter_than_pictures_every_draws_its_last_epoch(tmp_path):
    args = [
        "pretrain", "--model.encoder.embed_dim", "32", "--model.encoder.depth", "1",
        "--model.encoder.num_heads", "2", "--model.decoder_embed_dim", "32",
        "--model.decoder_num_heads", "2", "--optim.epochs", "1", "--optim.batch_size", "256",
        "--run.output_dir", str(tmp_path), "--run.pictures_every", "5",
        "--run.monitor_every", "-1", *QUIET,
    ]  # fmt: skip
    assert main(args) == 0
    assert len(list((tmp_path / "pictures").glob("epoch-0001-*.png"))) == 4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two epochs of DropPos on a few hundred demo images, with pictures every epoch."""
    out = tmp_path_factory.mktemp("pretrain")
    args = [
        "pretrain", "--model.encoder.embed_dim", "32", "--model.encoder.depth", "1",
        "--model.encoder.num_heads", "2", "--model.decoder_embed_dim", "32",
        "--model.decoder_num_heads", "2", "--optim.epochs", "2", "--optim.batch_size", "256",
        "--run.output_dir", str(out), "--run.precision", "fp32", "--run.pictures_every", "1",
        *QUIET,
    ]  # fmt: skip
    assert main(args) == 0
    return out


def test_pretraining_draws_the_jigsaw_into_the_output_folder_and_tensorboard(pretrained):
    pictures = sorted((pretrained / "pictures").glob("*.png"))
    assert [p.name for p in pictures[:2]] == ["epoch-0001-00.png", "epoch-0001-01.png"]
    assert len(pictures) == 8  # 4 images x 2 epochs
    events = list((pretrained / "tensorboard").glob("events.*"))
    assert events and max(e.stat().st_size for e in events) > 10_000  # the images are in


def test_visualize_writes_pngs_of_the_expected_size(tmp_path, pretrained):
    out = tmp_path / "pictures"
    args = [
        "visualize",
        "--model.checkpoint",
        str(pretrained / "last.pth"),
        "--run.output_dir",
        str(out),
    ]
    assert main([*args, "--data.images", "3"]) == 0
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 3
    with Image.open(pictures[0]) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    # five panels of the 28x28 demo images enlarged 7x (196 px), 8 px apart; above them a title
    # row, below them a caption, the error map's key and the heat map's scale
    panel = 7 * 28
    assert pixels.shape[1] == 5 * panel + 6 * 8
    assert pixels.shape[0] > panel + 3 * 20
    key = pixels[24 + panel :]  # the rows under the panels
    for colour, _ in ERROR_KEY:  # every colour of the error map has its swatch in the key
        assert (key == colour).all(axis=-1).any(), colour
    scale = key[:, -8 - panel : -8]
    assert (scale == heat(np.array(1.0))).all(axis=-1).any()  # the scale reaches white


def test_one_dominant_weight_does_not_blacken_the_heat_map():
    weights = np.full(16, 1 / 32)
    weights[5] = 0.5
    levels, top = heat_levels(weights)
    assert top == 0.5 and levels[5] == 1.0  # the scale's end is the largest weight
    assert levels[0] == 0.25  # a sixteenth of it is drawn at a quarter, red, not black
    assert heat(levels[0])[0] > 150
    assert heat_levels(np.zeros(16))[1] == 1.0  # nothing to scale: no division by zero


def test_probe_position_reads_our_checkpoints_and_a_plain_timm_state_dict(
    tmp_path, pretrained, capsys
):
    common = ["--probe.seeds", "2", "--probe.epochs", "3", "--probe.max_train_images", "300",
              "--probe.max_val_images", "100", *QUIET]  # fmt: skip
    out = tmp_path / "ours"
    args = ["probe-position", "--model.checkpoint", str(pretrained / "last.pth")]
    assert main([*args, "--run.output_dir", str(out), *common]) == 0
    found = results(out)
    assert found["chance_top1"] == 6.25 and len(found["seeds"]) == 2
    assert found["val_patches"] == 100 * 12  # 0.75 of 16 positions dropped per image
    assert found["top1"] > found["chance_top1"]  # the demo's objects sit in the middle

    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, depth=1, num_classes=10
    )  # a supervised-style timm ViT-Tiny: its width tells the number of heads
    path = tmp_path / "plain_timm.pth"
    torch.save(vit.state_dict(), path)
    out = tmp_path / "timm"
    args = ["probe-position", "--model.checkpoint", str(path), "--probe.drop_ratio", "0"]
    assert main([*args, "--run.output_dir", str(out), *common]) == 0
    assert results(out)["val_patches"] == 100 * 16  # ratio 0: every patch probed
    assert "position probe" in capsys.readouterr().out


@pytest.mark.slow  # a pre-training and a fine-tuning; the refusals stay in the default run
def test_order_sensitivity_reports_every_condition(tmp_path, pretrained):
    finetuned = tmp_path / "finetune"
    args = ["finetune", "--model.checkpoint", str(pretrained / "last.pth"), "--optim.epochs",
            "1", "--optim.batch_size", "250", "--run.output_dir", str(finetuned),
            "--run.precision", "fp32", "--run.tensorboard", "false", *QUIET]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "order"
    args = ["order-sensitivity", "--model.checkpoint", str(finetuned / "best.pth")]
    assert main([*args, "--run.output_dir", str(out), *QUIET]) == 0
    top1 = results(out)["top1"]
    assert set(top1) == {"intact", "shuffled_patches", "no_positions", "tile_jigsaw"}
    assert results(out)["images"] == 1000
    assert top1["intact"] > 15  # above chance (10%): the classifier learnt something


def test_order_sensitivity_needs_a_classifier(tmp_path, pretrained, capsys):
    args = ["order-sensitivity", "--model.checkpoint", str(pretrained / "last.pth")]
    assert main([*args, "--run.output_dir", str(tmp_path), *QUIET]) == 2
    assert "has no classifier head" in capsys.readouterr().err
