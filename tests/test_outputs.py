"""Outputs: written whole where the user pointed, never through a link droppos did not make,
with the mode the user's umask gives (a teammate can read an export)."""

import os
import stat

import pytest
from safetensors.torch import save_file

from droppos.cli.main import main
from droppos.engine.logging import MetricWriter, write_config, write_json
from droppos.interop.backbone import random_backbone
from droppos.models.encoder import EncoderConfig
from droppos.outputs import PARTIAL_SUFFIX, write_text
from tests.helpers import write_split_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def weights(tmp_path):
    """A tiny encoder's timm-named weights (32 wide, 2 heads, greyscale 16 x 16)."""
    path = tmp_path / "tiny.safetensors"
    save_file(random_backbone(EncoderConfig(16, 4, 1, 32, 2, 2)).state, str(path))
    return path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def export(weights, folder):
    return main(
        ["export", "--model.checkpoint", str(weights), "--model.num_heads", "2",
         "--run.output_dir", str(folder)]
    )  # fmt: skip


def test_export_files_follow_the_umask(tmp_path, weights, umask_022):
    out = tmp_path / "export"
    assert export(weights, out) == 0
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"model.safetensors", "config.json", "mmseg_mae.pth"}
    assert out / "hf" / "model.safetensors" in written
    assert {mode(p) for p in written} == {0o644}
    assert not list(out.rglob(f"*{PARTIAL_SUFFIX}"))


def test_export_refuses_a_dangling_link_named_like_its_output(tmp_path, weights, capsys):
    """`exists()` is false for a dangling link: the export would have written through it."""
    out, target = tmp_path / "export", tmp_path / "elsewhere" / "planted.safetensors"
    target.parent.mkdir()
    out.mkdir()
    (out / "model.safetensors").symlink_to(target)
    assert export(weights, out) == 2
    assert "already holds an export (model.safetensors)" in capsys.readouterr().err
    assert not target.exists()


def test_a_link_in_place_of_an_output_is_replaced_not_written_through(tmp_path, umask_022):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    for name, write in [
        ("results.json", lambda p: write_json(p, {"top1": 1.0})),
        ("config.yaml", lambda p: write_config(EncoderConfig(), p.parent)),
        ("notes.txt", lambda p: write_text(p, "new")),
    ]:
        link = tmp_path / "run" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(target)
        write(link)
        assert not link.is_symlink() and link.is_file()
        assert mode(link) == 0o644
    assert target.read_text() == "keep me"


def test_metrics_are_never_appended_through_a_link(tmp_path):
    target = tmp_path / "victim.jsonl"
    target.write_text("")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(target)
    with pytest.raises(ValueError, match=r"metrics\.jsonl is a symbolic link"):
        MetricWriter(run, tensorboard=False)
    assert target.read_text() == ""


@pytest.mark.parametrize("owner_file", ["marker", "results"])
def test_no_command_writes_over_another_commands_run(tmp_path, owner_file, capsys):
    """`knn --run.output_dir runs/pre` would replace the pre-training run's config.yaml."""
    run = tmp_path / "pre"
    run.mkdir()
    (run / "config.yaml").write_text("the pre-training run's own\n")
    if owner_file == "marker":
        (run / ".droppos-run").write_text("pretrain\n")
    else:  # a folder from before the marker named its command
        (run / ".droppos-run").write_text("")
        (run / "results.json").write_text('{"command": "probe-position"}')
    owner = "pretrain" if owner_file == "marker" else "probe-position"
    args = ["knn", "--model.checkpoint", "random", "--data.source", "demo"]
    assert main([*args, "--run.output_dir", str(run)]) == 2
    assert f"holds a `{owner}` run: give `knn` a folder of its own" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "the pre-training run's own\n"


def test_a_new_run_folder_names_its_command(tmp_path):
    from droppos.engine.context import RUN_MARKER, check_output_dir, command_of

    run = tmp_path / "knn"
    data = write_split_images(tmp_path / "data")
    args = ["knn", "--model.checkpoint", "random", "--data.source", str(data), "--knn.k", "3"]
    tiny = ["--model.encoder.img_size", "16", "--model.encoder.patch_size", "4",
            "--model.encoder.embed_dim", "32", "--model.encoder.depth", "1",
            "--model.encoder.num_heads", "2", "--data.num_workers", "0"]  # fmt: skip
    assert main([*args, *tiny, "--run.output_dir", str(run)]) == 0
    assert (run / RUN_MARKER).read_text() == "knn\n" and command_of(run) == "knn"
    check_output_dir(run, command="knn")  # the same command may write again
