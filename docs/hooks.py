"""MkDocs hooks: pages made from files that live elsewhere, so that each has one home.

- `guide/configuration.md`: every command's options, rendered from the option dataclasses by
  `droppos.cli.reference` (the same text as `--help`);
- `results/study.md`, `results/benchmarks.md` and the study's pictures: `benchmarks/STUDY.md`,
  `benchmarks/RESULTS.md` and `benchmarks/study/**.png`, which live beside the scripts that
  measured them;
- `changelog.md`: CHANGELOG.md;
- `{{ version }}` in a page: droppos's version (`droppos/_version.py`, what the wheel and
  `droppos --version` say).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

from droppos._version import __version__
from droppos.cli.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
COPIED = {
    "results/study.md": ROOT / "benchmarks" / "STUDY.md",
    "results/benchmarks.md": ROOT / "benchmarks" / "RESULTS.md",
    "changelog.md": ROOT / "CHANGELOG.md",
}


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "guide/configuration.md", content=reference_markdown()))
    for uri, source in COPIED.items():
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    study = ROOT / "benchmarks" / "study"
    for picture in sorted(study.rglob("*.png")):
        uri = f"results/study/{picture.relative_to(study).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(picture)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace("{{ version }}", __version__)


def on_config(config):
    config["copyright"] = f"droppos {__version__} · Apache-2.0"
    return config
