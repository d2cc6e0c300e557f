"""A newcomer's first hour: one version everywhere, `--help` that shows every choice, and a
mistake answered by one line that names what to change (and leaves no folder behind)."""

import re
from pathlib import Path

import pytest
import yaml

from droppos import __version__
from droppos.cli.main import COMMANDS, bracket_lists, main, parser_for, to_config
from droppos.cli.reference import reference_markdown
from droppos.evaluation.knn import check_k
from droppos.interop.schema import Classifier, Progress, TrainingCheckpoint, save_atomic
from droppos.methods import method_names, pretrained_model
from droppos.models import EncoderConfig

ROOT = Path(__file__).parents[1]


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# -- one version -----------------------------------------------------------------------------


def test_version_is_stated_once_and_agreed_on(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"droppos {__version__}"
    project = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', project, re.M)  # no second, static version
    assert not re.search(r'^version = "', project, re.M)
    # what the wheel's metadata is built from
    assert 'version = { attr = "droppos._version.__version__" }' in project
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == __version__
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == __version__
    hooks = (ROOT / "docs" / "hooks.py").read_text()  # the site's footer and `{{ version }}`
    assert "from droppos._version import __version__" in hooks


def test_the_repository_has_a_license_and_a_citation():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())["preferred-citation"]
    assert citation["title"].startswith("DropPos: Pre-Training Vision Transformers")
    assert citation["authors"][0]["family-names"] == "Wang"


# -- --help and the configuration reference --------------------------------------------------


def test_help_lists_every_method_and_whole_section_titles():
    for method in method_names():
        parser = parser_for(["pretrain", "--model.name", method])
        sub = parser._subcommands_action._name_parser_map["pretrain"]
        name = next(a for a in sub._actions if "--model.name" in a.option_strings)
        help_text = sub.format_help()
        assert name.metavar == "{" + ",".join(method_names()) + "}"
        assert "Literal[" not in help_text.split("--model.name", 2)[2][:300]
        for group in sub._action_groups:
            title = group.title or ""
            assert title.count("(") == title.count(")") and title.count("`") % 2 == 0, title


def test_the_configuration_reference_has_every_command_and_method():
    reference = reference_markdown()
    for command in COMMANDS:
        assert f"\n## {command}\n" in reference
    for method in method_names():
        assert f"--model.name {method}" in reference
    mae = reference.split("### `--model.name mae`")[1].split("\n## ")[0]
    assert "`--model.patch_mask_ratio`" in mae  # each method's own options, not only its encoder
    assert "`--knn.k`" in reference and "`--head.name" in reference  # segment, automatically


# -- messages ----------------------------------------------------------------------------------


def test_another_librarys_option_name_points_at_droppos_own(capsys):
    line = error_line(capsys, ["pretrain", "--optim.learning_rate", "1"])
    assert "did you mean --optim.lr?" in line
    line = error_line(capsys, ["linprobe", "--optim.lr", "1"])
    assert "did you mean --probe.base_lrs?" in line


def test_a_wrong_value_names_the_accepted_types(capsys):
    line = error_line(capsys, ["pretrain", "--optim.lr=abc"])
    assert line.endswith("--optim.lr: expected float or null, got 'abc'") and "Union" not in line


@pytest.mark.parametrize("given", [["--probe.base_lrs", "0.1,1"], ["--probe.base_lrs=0.1,1"],
                                   ["--probe.base_lrs", "[0.1, 1]"]])  # fmt: skip
def test_a_list_option_takes_what_help_shows(given):
    argv = ["linprobe", *given]
    parser = parser_for(argv)
    config = to_config(parser, parser.parse_args(bracket_lists(argv, parser)), "linprobe")
    assert config.probe.base_lrs == [0.1, 1.0]


def test_knn_refuses_more_neighbours_than_images_and_leaves_no_folder(tmp_path, capsys):
    check_k(20, 20)
    with pytest.raises(ValueError, match=r"--knn\.k 21 is more neighbours than the 20 training"):
        check_k(21, 20)
    out = tmp_path / "knn"
    argv = ["knn", "--model.checkpoint", "random", "--knn.k", "100000"]
    line = error_line(capsys, [*argv, "--run.output_dir", str(out)])
    assert "--knn.k 100000 is more neighbours than the 4000 training images" in line
    assert not out.exists()  # refused: no empty folder with droppos's marker left behind


def classifier_content() -> dict:
    header = Classifier(EncoderConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=32,
                                      depth=1, num_heads=2),
                        "avg", 10, None, None, None, "runs/pretrain/last.pth")  # fmt: skip
    return header.to_dict()


def test_a_picture_of_a_classifier_names_the_file_and_what_it_holds():
    with pytest.raises(ValueError) as error:
        pretrained_model({**classifier_content(), "model": {}}, "runs/finetune/best.pth")
    assert str(error.value).startswith(
        "runs/finetune/best.pth holds a droppos fine-tuned classifier, not a droppos "
        "pre-training checkpoint"
    )


def test_resuming_pretraining_from_a_fine_tuning_run_says_what_the_file_holds(tmp_path, capsys):
    content = classifier_content()
    saved = TrainingCheckpoint(
        Classifier.from_dict(content), {}, {}, {}, Progress(1, 0, 10), {}, {}
    ).to_dict()
    path = save_atomic(saved, tmp_path / "last.pth")
    out = tmp_path / "resumed"
    line = error_line(
        capsys,
        ["pretrain", "--run.resume", str(path), "--run.output_dir", str(out),
         "--run.monitor_every", "-1"],
    )  # fmt: skip
    assert "holds a droppos fine-tuned classifier, not a droppos pre-training checkpoint" in line
    assert "pick another" not in line and not out.exists()
