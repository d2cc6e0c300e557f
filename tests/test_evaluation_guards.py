"""No evaluation silently scores its own training data, or a head on classes it never saw."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from droppos.cli.main import main
from droppos.interop.backbone import random_backbone
from droppos.models.encoder import EncoderConfig
from tests.helpers import write_split_images

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
        "--model.encoder.embed_dim", "32", "--model.encoder.depth", "1",
        "--model.encoder.num_heads", "2"]  # fmt: skip
QUIET = ["--data.num_workers", "0", "--run.progress", "false"]


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """Class folders without train/ and val/: one set of images."""
    root = write_split_images(tmp_path_factory.mktemp("split"))
    flat = root.parent / "flat"
    shutil.copytree(root / "train", flat)
    return flat


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_an_evaluation_on_a_folder_without_val_refuses_to_score_its_training_images(
    tmp_path, flat_folder, command, capsys
):
    args = [command, "--model.checkpoint", "random", *TINY, "--data.source", str(flat_folder)]
    assert main([*args, "--run.output_dir", str(tmp_path / "out"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "has no val split" in err and "--data.val_from_train" in err
    assert "Traceback" not in err


def test_holding_out_validation_images_is_the_way_through(tmp_path, flat_folder):
    args = ["knn", "--model.checkpoint", "random", *TINY, "--data.source", str(flat_folder)]
    args += ["--data.val_from_train", "8", "--knn.k", "3"]
    assert main([*args, "--run.output_dir", str(tmp_path / "out"), *QUIET]) == 0


def test_order_sensitivity_refuses_a_head_of_other_classes(tmp_path, capsys):
    """A 2-class classifier scored on 3-class data reported 33.3 % without a word."""
    state = random_backbone(EncoderConfig(16, 4, 3, 32, 1, 2)).state
    state |= {"head.weight": torch.zeros(2, 32), "head.bias": torch.zeros(2)}
    weights = tmp_path / "classifier.safetensors"
    save_file(state, str(weights))
    data = write_split_images(tmp_path / "data")
    for split in ("train", "val"):
        (data / split / "c").mkdir()
        shutil.copy(next((data / split / "a").iterdir()), data / split / "c" / "0.png")
    args = ["order-sensitivity", "--model.checkpoint", str(weights), "--model.num_heads", "2"]
    args += ["--data.source", str(data), "--run.output_dir", str(tmp_path / "out"), *QUIET]
    assert main(args) == 2
    assert "classifies 2 classes, but --data.source" in capsys.readouterr().err
