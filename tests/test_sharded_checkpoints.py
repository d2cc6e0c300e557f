"""An FSDP run's sharded checkpoint (`last.pth` naming a folder of DCP shards), against a user
who moves files around and against crafted files: nothing lost, nothing read from outside the
folder, nothing allocated that the files do not hold, and every fault one line. The FSDP runs
are one gloo rank in this process (torchrun's variables set), on the CPU."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from droppos.cli.main import main
from droppos.engine.checkpointing import Checkpointer
from droppos.interop import sharded
from droppos.interop.schema import load_object, save_atomic
from tests.test_distributed import free_ports, pretrain_args

pytestmark = pytest.mark.usefixtures("one_thread")


def fsdp_pretrain(monkeypatch, output_dir: Path, data: Path, *extra: str) -> int:
    """`droppos pretrain --run.strategy fsdp` as torchrun would start it with one process."""
    port = str(free_ports(1)[0])
    with monkeypatch.context() as env:
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
            env.setenv(name, value)
        env.setenv("MASTER_ADDR", "127.0.0.1")
        env.setenv("MASTER_PORT", port)
        return main(pretrain_args(output_dir, data, 4, "--run.strategy", "fsdp", *extra))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, image_folder):
    """A finished FSDP pre-training run: its folder (`last.pth` and one shards folder)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert fsdp_pretrain(monkeypatch, out, image_folder / "train") == 0
    return out


@pytest.fixture
def run(fsdp_run, tmp_path):
    """This test's own copy of the run, to move files in or craft."""
    return Path(shutil.copytree(fsdp_run, tmp_path / "runs" / "run", symlinks=True))


def shards_of(run: Path) -> Path:
    return run / load_object(run / "last.pth", whole=False)["shards"]


def name_shards(checkpoint: Path, name: object) -> None:
    content = dict(load_object(checkpoint, whole=False))
    content["shards"] = name
    save_atomic(content, checkpoint)


def rewrite_metadata(folder: Path, change) -> None:
    """`change` DCP's metadata of a folder this test's own run wrote (plain pickle: trusted)."""
    path = folder / sharded.METADATA_FILE
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


_OPENED: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | Path):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks stay for the process: it records only on demand


@contextlib.contextmanager
def opens_recorded() -> Iterator[list[str]]:
    """The paths the block opens, as it goes."""
    global _OPENED
    _OPENED = opened = []
    try:
        yield opened
    finally:
        _OPENED = None


def read_outside(opened: list[str], run: Path) -> list[str]:
    return [path for path in opened if not path.startswith(f"{run}/")]


# -- item: a checkpoint moved aside keeps its weights ------------------------------------------


def test_a_checkpoint_moved_aside_keeps_its_own_weights_when_a_run_starts_afresh(
    run, image_folder, monkeypatch
):
    """`mv last.pth last.pth.bak` then a fresh run in the same folder: the shards folder the
    .bak names is not removed, and no new folder takes its name, so the .bak reads its own."""
    held = load_object(run / "last.pth")["model"]
    (run / "last.pth").rename(run / "last.pth.bak")
    assert fsdp_pretrain(monkeypatch, run, image_folder / "train", "--optim.base_lr", "0.03") == 0
    kept = load_object(run / "last.pth.bak")["model"]
    assert kept.keys() == held.keys()
    assert all(torch.equal(kept[name], value) for name, value in held.items())
    new = load_object(run / "last.pth")["model"]
    assert not all(torch.equal(new[name], value) for name, value in held.items())


def test_a_shards_folder_name_is_never_used_twice(tmp_path):
    """Two runs saving at the same step into a folder whose earlier shards were removed (the
    file that named them renamed beyond `*.pth*`) still pick different names."""
    names = [
        Checkpointer(tmp_path, True, torch.device("cpu"), sharded=True).new_shards_folder(6)
        for _ in range(2)
    ]
    assert names[0] != names[1]


# -- item: reads only inside the run's folder ---------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_last_pth_names_only_a_plain_folder_beside_it(run, where):
    """`..`, an absolute path or a link as the shards folder: refused in one line, and no
    tensor file outside the run's folder is opened."""
    outside = run.parent / "elsewhere"
    shards_of(run).rename(outside)
    if where == "parent":  # the run's parent made to look like a shards folder
        for file in list(outside.iterdir()):
            file.rename(run.parent / file.name)
        name = ".."
    elif where == "absolute":
        name = str(outside)
    else:
        (run / "shards-link").symlink_to(outside, target_is_directory=True)
        name = "shards-link"
    name_shards(run / "last.pth", name)
    with opens_recorded() as opened, pytest.raises(ValueError, match="plain folder") as refused:
        load_object(run / "last.pth")
    assert "\n" not in str(refused.value)
    assert str(run / "last.pth") in opened and read_outside(opened, run) == []


def point_outside(metadata, path: str) -> None:
    for info in metadata.storage_data.values():
        info.relative_path = path


def declare(elements: int):
    def change(metadata):
        entry = next(iter(metadata.state_dict_metadata.values()))
        entry.size = torch.Size([elements])

    return change


def one_range_for_all(metadata) -> None:
    first = next(iter(metadata.storage_data.values()))
    for index in metadata.storage_data:
        metadata.storage_data[index] = _StorageInfo(first.relative_path, first.offset, first.length)


def nest_in_a_list(metadata) -> None:
    fqn = next(iter(metadata.planner_data))
    metadata.planner_data[fqn] = ("model", 2**24, fqn)


CRAFTED = {
    "absolute path": (lambda m: point_outside(m, "{outside}"), "only plain file names"),
    "parent path": (lambda m: point_outside(m, "../outside.distcp"), "only plain file names"),
    "2^29 elements": (declare(2**29), "2147483648 bytes"),
    "2^32 elements": (declare(2**32), "17179869184 bytes"),
    "one byte range for every tensor": (one_range_for_all, "overlapping byte ranges"),
    "a name at index 2^24 of a list": (nest_in_a_list, "nests its tensors' names in lists"),
}


@pytest.mark.parametrize("craft", CRAFTED)
def test_a_crafted_metadata_is_refused_before_anything_is_read_or_allocated(
    run, craft, monkeypatch
):
    """Tensor files elsewhere, shapes the files cannot hold, byte ranges shared: one line naming
    `.metadata`, no file outside the folder opened, no tensor of the claimed size allocated."""
    folder = shards_of(run)
    outside = run.parent / "outside.distcp"
    shutil.copy(next(folder.glob("*.distcp")), outside)
    change, words = CRAFTED[craft]

    def crafted(metadata):
        change(metadata)
        for info in metadata.storage_data.values():
            info.relative_path = info.relative_path.format(outside=outside)

    rewrite_metadata(folder, crafted)
    allocated = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or empty(*a, **k))
    with opens_recorded() as opened, pytest.raises(ValueError) as refused:
        load_object(run / "last.pth")
    message = str(refused.value)
    assert words in message and f"{folder / '.metadata'}" in message and "\n" not in message
    assert str(folder / ".metadata") in opened and read_outside(opened, run) == []
    assert not any(a and isinstance(a[0], torch.Size) and a[0].numel() > 2**20 for a in allocated)


# -- item: every fault of a sharded checkpoint is one line, on every command -----------------


class RunsCode:
    """Unpickled, it would make a folder: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def remove_a_tensor_file(folder: Path) -> None:
    next(folder.glob("*.distcp")).unlink()


def damage_a_tensor_file(folder: Path) -> None:
    file = next(folder.glob("*.distcp"))
    data = bytearray(file.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    file.write_bytes(bytes(data))


def ask_to_run_code(folder: Path) -> None:
    (folder / sharded.METADATA_FILE).write_bytes(pickle.dumps(RunsCode(folder / "ran")))


def store_code_as_a_tensor(folder: Path) -> None:
    """The first tensor's bytes replaced by a torch file that asks to run code."""
    file = next(folder.glob("*.distcp"))
    payload = io.BytesIO()
    torch.save(RunsCode(folder / "ran"), payload)
    start = file.stat().st_size
    file.write_bytes(file.read_bytes() + payload.getvalue())

    def point_at_payload(metadata):
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index] = _StorageInfo(file.name, start, payload.tell())

    rewrite_metadata(folder, point_at_payload)


FAULTS = {
    "a missing .distcp": (remove_a_tensor_file, "which is missing"),
    "a damaged .distcp": (damage_a_tensor_file, "cannot read"),
    "a metadata that asks to run code": (ask_to_run_code, "asks to run code"),
    "a .distcp that asks to run code": (store_code_as_a_tensor, "asks to run code (posix.mkdir)"),
}


def export(run: Path, data: Path, monkeypatch) -> list[str]:
    return ["export", "--model.checkpoint", str(run / "last.pth"),
            "--run.output_dir", str(run.parent / "export")]  # fmt: skip


def knn(run: Path, data: Path, monkeypatch) -> list[str]:
    return ["knn", "--model.checkpoint", str(run / "last.pth"), "--data.source", str(data),
            "--data.num_workers", "0", "--run.output_dir", str(run.parent / "knn")]  # fmt: skip


def resume_in_one_process(run: Path, data: Path, monkeypatch) -> list[str]:
    return pretrain_args(run, data / "train", 4, "--optim.epochs", "3")


COMMANDS = [export, knn, resume_in_one_process, "resume under fsdp"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: getattr(c, "__name__", c))
def test_a_faulty_sharded_checkpoint_ends_every_command_in_one_line(
    run, image_folder, fault, command, monkeypatch, capsys
):
    """Loading as a backbone, exporting, resuming whole or shard by shard: exit status 2 and
    one line naming the shards folder; no traceback, no code run."""
    folder = shards_of(run)
    make_fault, words = FAULTS[fault]
    make_fault(folder)
    capsys.readouterr()
    if command == "resume under fsdp":
        code = fsdp_pretrain(monkeypatch, run, image_folder / "train", "--optim.epochs", "3")
    else:
        code = main(command(run, image_folder, monkeypatch))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err and str(folder) in err
    assert not (folder / "ran").exists()
