"""Every evaluation ends with one JSON file of results (and one line on the terminal)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from droppos._version import __version__
from droppos.engine.logging import write_json

RESULTS = "results.json"


def write_results(
    output_dir: str | Path, command: str, results: dict[str, Any], precision: str
) -> Path:
    """`output_dir/results.json` = {"command", "droppos_version", "date", "precision",
    "threads", **results}: how a figure was computed travels with it."""
    path = Path(output_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "droppos_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "precision": precision,
        "threads": torch.get_num_threads(),
        **results,
    }
    write_json(path, record)
    return path
