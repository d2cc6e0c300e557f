"""The documentation says what the code does: options exist, numbers match the presets, modules
named in the architecture page exist, nothing points at files users do not have."""

import ast
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from droppos.cli.main import COMMANDS, build_parser
from droppos.methods import method_names
from droppos.models.pixel_decoder import PixelDecoderConfig

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
# What a user reads: the front page, the site's pages, and the pages the site takes from
# benchmarks/ (docs/hooks.py). A figure or an option may live on any of them.
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), ROOT / "benchmarks" / "STUDY.md",
         ROOT / "benchmarks" / "RESULTS.md"]  # fmt: skip
USER_TEXT = "\n\n".join(page.read_text() for page in PAGES)


def every_option() -> set[str]:
    """Every `--section.option` any command accepts (pretrain with either model)."""
    options: set[str] = set()
    for model_name in method_names():
        parser = build_parser({"model": model_name})
        for command in COMMANDS:
            sub = parser._subcommands_action._name_parser_map[command]
            for action in sub._actions:
                options.update(action.option_strings)
    return options


def test_every_option_the_pages_name_exists():
    known = every_option()
    named = set(re.findall(r"(--[a-z_]+(?:\.[a-z_]+)+)", USER_TEXT))
    assert len(named) > 30
    prefixes = {o.rsplit(".", 1)[0] for o in known}  # a section named on its own: `--optim.*`
    # an option inside the optional nested config `--model.pixel_branch` (a field of it)
    nested = {f"--model.pixel_branch.{f.name}" for f in fields(PixelDecoderConfig)}
    # examples of what droppos refuses: an abbreviation, another library's name
    refused_examples = {"--optim.e", "--optim.learning_rate", "--optim.lr=abc"}
    unknown = sorted(n for n in named if n not in known | prefixes | nested | refused_examples)
    assert not unknown, unknown


def test_the_pages_describe_the_demo_preset_as_it_is():
    preset = yaml.safe_load((ROOT / "src/droppos/configs/tiny_cpu.yaml").read_text())
    encoder = preset["model"]["encoder"]
    side = encoder["img_size"] // encoder["patch_size"]
    demo = (DOCS / "results" / "demo.md").read_text()
    assert f"{encoder['depth']}-block ViT-Tiny" in demo
    assert f"{encoder['patch_size']}x{encoder['patch_size']} patches" in demo
    assert f"{side}x{side} grid of {side * side} positions" in demo
    for text in (README, demo):
        assert f"for {preset['optim']['epochs']} epochs" in text
    depths = {int(d) for d in re.findall(r"(\d+)-block ViT-Tiny", USER_TEXT)}
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
    for path in [*PAGES, *sorted((ROOT / "src").rglob("*.py"))]:
        assert not re.search(r"SPEC\b", path.read_text()), path
    for path in sorted((ROOT / "src/droppos/configs").glob("*.yaml")):
        assert "SPEC" not in path.read_text(), path


PACKAGE = ROOT / "src" / "droppos"
# Bottom to top: a package imports only packages below it (the root `droppos` is the public API).
LAYERS = ["_version", "_openmp", "outputs", "sections", "objective", "models", "data", "visual",
          "interop", "engine", "evaluation", "methods", "cli", ""]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every droppos module -> the droppos modules it imports, anywhere in its body (an import
    inside a function is still an import; `from package import module` names the module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (the modules on it, in order), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph()) == []


def test_each_package_imports_only_the_layers_below_it():
    def layer(module: str) -> int:
        return LAYERS.index(module.split(".")[1] if "." in module else "")

    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) >= layer(module) and target.split(".")[:2] != module.split(".")[:2]
    )
    assert not upward, upward


def test_method_names_are_spelled_only_in_the_methods_package():
    """Everything else looks a method up in the registry (`methods/registry.py`)."""
    spelled = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in method_names()
    )
    assert spelled and all(path.startswith("methods/") for path in spelled), spelled


# -- the pages' demo figures, against the JSON the script that measured them wrote ------------

FIGURES = ROOT / "benchmarks" / "results" / "demo_figures.json"

QUOTES = Path(__file__).with_name("demo_figure_quotes.txt")


def demo_quotes() -> list[tuple[str, str]]:
    """(page, template) of each of the pages' demo figures (tests/demo_figure_quotes.txt): a
    `# page: PATH` line names the page of the quotes that follow it."""
    quotes, page, lines = [], "README.md", []
    for line in [*QUOTES.read_text().splitlines(), "---"]:
        if line.startswith("# page: "):
            page = line.removeprefix("# page: ").strip()
        elif line == "---":
            if "\n".join(lines).strip():
                quotes.append((page, "\n".join(lines).strip()))
            lines = []
        elif not line.startswith("#"):
            lines.append(line)
    return quotes


def about(value: float) -> str:
    """A wall time as the pages round it: two significant digits (132 -> 130, 9.4 -> 9.4)."""
    return f"{float(f'{value:.2g}'):g}"


def figure(data: Any, path: str) -> Any:
    """`knn-pretrained-avg.top1`, `pretrain.epochs.4.loss`: keys may hold dots themselves
    (`probe-position-random-0.75`), so the longest key that matches is taken first."""
    parts = path.split(".")
    while parts:
        for end in range(len(parts), 0, -1):
            key = ".".join(parts[:end])
            if isinstance(data, list) and key.isdigit() and int(key) < len(data):
                data, parts = data[int(key)], parts[end:]
                break
            if isinstance(data, dict) and key in data:
                data, parts = data[key], parts[end:]
                break
        else:
            raise KeyError(f"{path}: no {parts[0]!r}")
    return data


def render(template: str, data: dict[str, Any]) -> str:
    def one(match: re.Match[str]) -> str:
        value = figure(data, match.group(1))
        spec = match.group(2) or ""
        return about(value) if spec == "about" else format(value, spec)

    return re.sub(r"\{([\w\-.]+)(?::([^}]*))?\}", one, template)


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_the_pages_quote_the_demo_figures_the_script_measured():
    """Each quote is found on the page it names (`# page: docs/...` above it in the file)."""
    data = json.loads(FIGURES.read_text())
    assert len(demo_quotes()) >= 12
    missing = [
        f"{page}: {rendered}"
        for page, template in demo_quotes()
        if (rendered := squeeze(render(template, data))) not in squeeze((ROOT / page).read_text())
    ]
    assert not missing, "the pages do not say (benchmarks/demo_figures.py measured):\n" + (
        "\n".join(missing)
    )


def test_the_figure_resolver_reads_dotted_keys_and_list_items():
    data = {"probe-0.75": {"top1": 41.25}, "runs": [{"loss": 1.5}, {"loss": 1.25}]}
    assert figure(data, "probe-0.75.top1") == 41.25 and figure(data, "runs.1.loss") == 1.25
    assert render("{probe-0.75.top1:.1f} in {runs.0.loss:about} s", data) == "41.2 in 1.5 s"
    with pytest.raises(KeyError):
        figure(data, "probe-0.5.top1")
