"""`droppos write-shards`: any data source droppos reads, written as WebDataset-style tar shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from droppos.data.catalog import build_source, source_splits
from droppos.data.shards import CLASSES_FILE, write_shard
from droppos.outputs import write_text
from droppos.sections import OutputSection, Sections


@dataclass
class ShardSourceSection:
    """The images written, and how many go in one shard."""

    source: str = "demo"
    """Any data source droppos reads (image folder, file list, fashion-mnist, demo)."""
    shard_size: int = 1000
    """Images per shard."""

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--data.shard_size must be >= 1, got {self.shard_size}")


@dataclass
class WriteShardsConfig(Sections):
    """Write a data source as WebDataset-style tar shards (fewer, larger files)."""

    data: ShardSourceSection = field(default_factory=ShardSourceSection)
    run: OutputSection = field(default_factory=lambda: OutputSection(output_dir="runs/shards"))


def check_output(output: Path, source: str) -> None:
    """Refuse (ValueError, one line) an output folder that would mix old and new shards or
    overlap the source being read (hold it, be it, or lie inside it, where the shards would
    become part of the data): shards are never appended to, nor written over or into data.
    Compared as real paths before anything is made: links followed, parts not yet made
    appended."""
    source_path = Path(source).expanduser()
    if source_path.exists():
        target, data = output.resolve(), source_path.resolve()
        if target.is_relative_to(data) or data.is_relative_to(target):
            real = f" (that is {target})" if target != output.absolute() else ""
            raise ValueError(
                f"--run.output_dir {output}{real} overlaps --data.source {source}: write the "
                "shards to a folder of their own"
            )
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(
            f"--run.output_dir {output} is not empty (older shards there would be read with the "
            "new ones): give a new or empty folder"
        )


def write_shards(config: WriteShardsConfig) -> dict[str, list[Path]]:
    """Write each split of the source as `output/{split}-NNNNNN.tar`; returns the files written.
    A source without splits is written as train; original files are copied, not re-encoded."""
    config.validate()
    output, source_name = Path(config.run.output_dir), config.data.source
    check_output(output, source_name)
    written: dict[str, list[Path]] = {}
    for split in source_splits(source_name):
        source = build_source(source_name, split)
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file or a dangling link in the way, no permission
            raise ValueError(f"cannot make --run.output_dir {output}: {error.strerror}") from None
        count, size = len(source), config.data.shard_size
        paths = []
        for start in range(0, count, size):
            path = output / f"{split}-{start // size:06d}.tar"
            indices = range(start, min(start + size, count))
            write_shard(path, ((f"{i:09d}", *source.encoded(i)) for i in indices))
            paths.append(path)
        written[split] = paths
        if source.classes:
            write_text(output / CLASSES_FILE, "\n".join(source.classes) + "\n")
    return written


def run(config: WriteShardsConfig) -> str:
    """The command: write, and say what was written."""
    written = write_shards(config)
    said = ", ".join(f"{split}: {len(paths)} shard(s)" for split, paths in written.items())
    return (
        f"wrote {config.data.source} to {config.run.output_dir} ({said}); train on it with "
        f"--data.source {config.run.output_dir}"
    )
