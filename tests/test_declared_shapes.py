"""A file's declared shape is checked, field by field and against the weights it holds, before
anything of that shape is built: a wrong type is one line, an absurd size allocates nothing."""

import json
import resource
import shutil

import pytest
import torch
from safetensors.torch import save_file

from droppos.cli.main import main
from droppos.evaluation.backbone import BackboneSection, backbone_from
from droppos.interop.backbone import random_backbone
from droppos.interop.schema import Classifier, ClassifierWeights
from droppos.models.encoder import EncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An export of a tiny encoder: timm's model.safetensors + config.json, and hf/."""
    root = tmp_path_factory.mktemp("export")
    weights = root / "tiny.safetensors"
    save_file(random_backbone(EncoderConfig(16, 4, 1, 32, 2, 2)).state, str(weights))
    args = ["export", "--model.checkpoint", str(weights), "--model.num_heads", "2"]
    assert main([*args, "--run.output_dir", str(root / "out")]) == 0
    return root / "out"


def edited(exported, tmp_path, file, **fields):
    folder = tmp_path / "edited"
    shutil.copytree(exported, folder)
    config = json.loads((folder / file).read_text())
    target = config.get("model_args", config)
    target.update(fields)
    (folder / file).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "fields",
    [
        {"hidden_size": "32"},
        {"num_hidden_layers": 2.0},
        {"patch_size": [4, 4]},
        {"hidden_size": 0},
        {"num_attention_heads": True},
        {"intermediate_size": None},
    ],
)
def test_a_hugging_face_config_of_wrong_types_is_one_line(exported, tmp_path, fields, capsys):
    folder = edited(exported, tmp_path, "hf/config.json", **fields)
    if fields.get("intermediate_size", 1) is None:
        config = json.loads((folder / "hf/config.json").read_text())
        del config["intermediate_size"]
        (folder / "hf/config.json").write_text(json.dumps(config))
    args = [
        "knn",
        "--model.checkpoint",
        str(folder / "hf"),
        "--run.output_dir",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--run.progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1


def test_a_declared_shape_the_weights_cannot_fill_allocates_nothing(exported, tmp_path):
    """256 blocks x 4096 wide x MLP 16: each field within bounds, ~600 GB together."""
    huge = EncoderConfig(16, 4, 1, 4096, 256, 32, 16.0)
    tiny = random_backbone(EncoderConfig(16, 4, 1, 32, 2, 2)).state
    header = Classifier(huge, "avg", 0, None, None, None, "tiny")
    best = tmp_path / "best.pth"
    torch.save(ClassifierWeights(header, tiny, None, 0, 0.0).to_dict(), best)
    hf = edited(exported, tmp_path, "hf/config.json", num_hidden_layers=256, hidden_size=4096,
                num_attention_heads=32, intermediate_size=65536) / "hf"  # fmt: skip
    for target in (best, hf):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(ValueError, match="declares"):
            backbone_from(BackboneSection(checkpoint=str(target), random_init=True))
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


@pytest.mark.parametrize(
    "text",
    ["optim: 5\n", "model: [1]\n", "model:\n  encoder: 7\n", "run: null\n", "- 1\n"],
)
def test_a_malformed_config_file_is_one_line_naming_the_key(tmp_path, text, capsys):
    """`model: [1]` used to train a ViT-B/16 at 224 instead of the demo model, silently."""
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["pretrain", "--config", str(config), "--run.output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--config" in err
    key = text.split(":")[0].strip()
    assert f"`{key}` is a section" in err or "expected a mapping" in err or "encoder" in err
