"""The documentation says what the code does: options exist, numbers match the presets, modules
named in the architecture page exist, nothing points at files users do not have."""

import re
from pathlib import Path

import pytest
import yaml

from droppos.cli.main import COMMANDS, build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def every_option() -> set[str]:
    """Every `--section.option` any command accepts (pretrain with either model)."""
    options: set[str] = set()
    for model_name in ("droppos", "mae"):
        parser = build_parser(model_name)
        for command in COMMANDS:
            sub = parser._subcommands_action._name_parser_map[command]
            for action in sub._actions:
                options.update(action.option_strings)
    return options


def test_every_option_the_readme_names_exists():
    known = every_option()
    named = set(re.findall(r"(--[a-z_]+(?:\.[a-z_]+)+)", README))
    assert len(named) > 30
    prefixes = {o.rsplit(".", 1)[0] for o in known}  # a section named on its own: `--optim.*`
    # an option inside an optional nested config (`--model.pixel_branch.depth`)
    nested = {n for n in named if n.rsplit(".", 1)[0] in known}
    unknown = sorted(n for n in named if n not in known | prefixes | nested)
    assert not unknown, unknown


def test_the_readme_describes_the_demo_preset_as_it_is():
    preset = yaml.safe_load((ROOT / "src/droppos/configs/tiny_cpu.yaml").read_text())
    encoder = preset["model"]["encoder"]
    side = encoder["img_size"] // encoder["patch_size"]
    assert f"{encoder['depth']}-block ViT-Tiny" in README
    assert f"{encoder['patch_size']}x{encoder['patch_size']} patches" in README
    assert f"{side}x{side} grid of {side * side} positions" in README
    assert f"for {preset['optim']['epochs']} epochs" in README
    depths = {int(d) for d in re.findall(r"(\d+)-block ViT-Tiny", README)}
    assert depths == {encoder["depth"]}  # no other depth claimed anywhere


@pytest.mark.parametrize("page", ["method.md", "architecture.md"])
def test_the_pages_exist_and_name_only_modules_that_exist(page):
    text = (DOCS / page).read_text()
    paths = set(re.findall(r"\b((?:[a-z_]+/)+[a-z_]+\.py)\b", text))
    assert page == "method.md" or len(paths) > 15
    for path in paths:
        path = path.removeprefix("src/").removeprefix("droppos/")
        candidates = [ROOT / path, ROOT / "src" / "droppos" / path]
        assert any(c.is_file() for c in candidates), path
    for module, name in re.findall(r"\b((?:[a-z_]+/)+[a-z_]+)\.py:(\w+)", text):
        source = (ROOT / "src" / "droppos" / f"{module}.py").read_text()
        assert re.search(rf"\b(def|class) {name}\b|^{name}\b.*=", source, re.M), (module, name)


def test_nothing_points_at_a_spec_users_do_not_have():
    for path in [ROOT / "README.md", *sorted((ROOT / "src").rglob("*.py"))]:
        assert not re.search(r"SPEC\b", path.read_text()), path
    for path in sorted((ROOT / "src/droppos/configs").glob("*.yaml")):
        assert "SPEC" not in path.read_text(), path


def test_the_lower_packages_never_import_evaluation_or_cli():
    for package in ("engine", "interop", "models", "objective", "data", "visual"):
        for path in sorted((ROOT / "src" / "droppos" / package).glob("*.py")):
            imports = re.findall(r"^\s*(?:from|import) (droppos\.\w+)", path.read_text(), re.M)
            assert not {"droppos.evaluation", "droppos.cli"} & set(imports), path
