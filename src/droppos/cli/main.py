"""`droppos <command>`: typed options from dataclasses, YAML presets, one-line user errors.

Each command is its configuration dataclass and a `run(config) -> line` function, both in the
module that does the work; `COMMANDS` lists them. jsonargparse turns a configuration into options
(`--optim.epochs 10`), reads YAML (`--config configs/vit_base_in1k.yaml`, or just the preset's
name), and prints every option with its default and a one-line description in `--help`. A section
whose field lists variants (pretrain's `model`: the registered methods) takes the variant named by
`--SECTION.name`, so every option reaches its method and another method's option is an error,
not silently ignored. `run_command` is the one runner: it maps every way a command can fail to one
line and an exit status.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
    set_parsing_settings,
)

from droppos._version import PACKAGE, __version__
from droppos.data import write_shards
from droppos.data.decode import BadImageError
from droppos.engine.context import RUN_MARKER
from droppos.engine.distributed import shutdown_distributed
from droppos.engine.guards import RunStopped
from droppos.evaluation import (
    finetune,
    knn,
    linprobe,
    order_sensitivity,
    position_probe,
    segment,
)
from droppos.interop import export
from droppos.methods import method_named, method_names, pretrain, visualize

set_parsing_settings(docstring_parse_attribute_docstrings=True)


@dataclass(frozen=True)
class Command:
    """A command of the command line: its configuration, what runs it, and its help line."""

    config: type
    run: Callable[[Any], str | None]
    help: str


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        pretrain.PretrainConfig,
        pretrain.run,
        "Pre-train a ViT with DropPos (default: the built-in demo).",
    ),
    "finetune": Command(
        finetune.FinetuneConfig,
        finetune.run,
        "Fine-tune a checkpoint end to end for classification.",
    ),
    "linprobe": Command(
        linprobe.LinprobeConfig,
        linprobe.run,
        "Linear probe on frozen features (a sweep of learning rates).",
    ),
    "knn": Command(knn.KnnConfig, knn.run, "Weighted kNN classification on frozen features."),
    "segment": Command(
        segment.SegmentConfig,
        segment.run,
        "Semantic segmentation on a backbone: linear head (frozen or fine-tuned) or dense kNN.",
    ),
    "probe-position": Command(
        position_probe.PositionProbeConfig,
        position_probe.run,
        "How well a frozen backbone knows where its patches are (linear position probe).",
    ),
    "order-sensitivity": Command(
        order_sensitivity.OrderSensitivityConfig,
        order_sensitivity.run,
        "Top-1 of a fine-tuned classifier with intact, shuffled and position-less inputs.",
    ),
    "visualize": Command(
        visualize.VisualizeConfig,
        visualize.run,
        "Pictures of the jigsaw a pre-training checkpoint solves (DropPos, MP3).",
    ),
    "write-shards": Command(
        write_shards.WriteShardsConfig,
        write_shards.run,
        "Write a data source as WebDataset-style tar shards.",
    ),
    "export": Command(
        export.ExportConfig,
        export.run,
        "Export a checkpoint for timm, Detectron2 ViTDet and MMSegmentation.",
    ),
}


class UsageError(Exception):
    """A command-line mistake, as one line (the usage is for `--help`)."""


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, except where an option states its own type: `--model.name` lists
    every registered method, where its annotation names only the section's own."""

    def _get_type_str(self, action: Any) -> str | None:
        return getattr(action, "type_in_help", None) or super()._get_type_str(action)


class Parser(ArgumentParser):
    """jsonargparse without prefix abbreviations, whose errors are one line, not a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise UsageError(usage_line(message, self))


def methods_taking(option: str) -> list[str]:
    """The pre-training methods whose `--model.*` section has `option` (`--model.smoothing_sigma`
    -> droppos, mp3): what to say when another method's option was given."""
    parts = option.removeprefix("--").split(".")
    if len(parts) < 2 or parts[0] != "model" or parts[1] in ("name", "encoder"):
        return []
    return [
        name
        for name in method_names()
        if parts[1] in {f.name for f in fields(method_named(name).Config)}
    ]


# Names other libraries give droppos's options (`--optim.learning_rate`): each -> droppos's names,
# the first one a command has being suggested (linprobe sweeps `--probe.base_lrs`, not `lr`).
SYNONYMS = {
    "learning_rate": ("lr", "base_lr", "base_lrs"),
    "lr": ("lr", "base_lr", "base_lrs"),
    "base_lr": ("base_lr", "base_lrs"),
    "lrs": ("base_lrs",),
    "wd": ("weight_decay",),
    "bs": ("batch_size",),
    "batch": ("batch_size",),
    "epoch": ("epochs",),
    "num_epochs": ("epochs",),
}


def closest_option(option: str, known: list[str]) -> str | None:
    """The option a typo most likely meant: one the typed text begins (`--optim.e` ->
    `--optim.epochs`, the shortest such), else droppos's name for another library's
    (`--optim.learning_rate` -> `--optim.lr`), else the closest spelling in any section
    (`--optm.epochs` -> `--optim.epochs`), else None. Never applied, only suggested."""
    started = [k for k in known if k.startswith(option) and k != option]
    if started:
        return min(started, key=len)
    section, _, leaf = option.removeprefix("--").rpartition(".")
    for synonym in SYNONYMS.get(leaf, ()):
        named = [k for k in known if k.rsplit(".", 1)[-1] == synonym]
        if named:  # the typed section first (`--optim.lr`), else any (`--probe.base_lrs`)
            return min(named, key=lambda k: (not k.startswith(f"--{section}."), len(k)))
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = option.removeprefix("--").rsplit(".", 1)[-1]  # the name without (or in the wrong)
    for matches in (str.__eq__, str.startswith):  # section: `--checkpoint`, `--output`
        elsewhere = [k for k in known if matches(k.rsplit(".", 1)[-1], leaf)]
        if elsewhere:
            return min(elsewhere, key=len)
    return None


def usage_line(message: str, parser: ArgumentParser) -> str:
    """jsonargparse's message, cut to the line that matters, with a suggestion for a typo."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Problems parsing config"):  # YAML syntax
        where = next((x for x in lines if re.search(r"line \d+", x)), "")
        line = re.search(r"line \d+, column \d+", where)
        what = " ".join(x for x in lines[1:] if not x.startswith("in ")) or lines[0]
        at = f" at {line.group(0)}" if line else ""
        return f"--config: the YAML file does not parse{at}: {what}"
    unknown = re.search(r"[Uu]nrecognized arguments: (\S+)", message) or re.search(
        r"does not accept option '([\w.]+)'", message
    )
    if unknown:
        option = "--" + unknown.group(1).split("=")[0].removeprefix("--")
        known = [o for a in parser._actions for o in a.option_strings if "." in o]
        owners = methods_taking(option) if (parser.prog or "").endswith("pretrain") else []
        if owners:
            return (
                f"unknown option {option}: it is an option of --model.name "
                f"{' / '.join(owners)}, not of the chosen method (--help lists its options)"
            )
        close = closest_option(option, known)
        hint = f"; did you mean {close}?" if close else ""
        return f"unknown option {option}{hint} (--help lists them)"
    for line in lines:  # a wrong value: jsonargparse names the key, then the reason
        if line.startswith(("Parser key", "Key ")):
            key = re.search(r'"([\w.]+)"', line)
            reason = next(
                (x for x in lines if x.startswith(("Expected", "Given value", "Does not"))), ""
            )
            union = re.search(r"Subtypes: \[(.*)\]", message)
            given = re.search(r"Given value: (.*)", message)
            if key and union and given:  # `float | None`: name the types, not "Union subtypes"
                types = re.findall(r"<class '(\w+)'>|(\w+\[.*?\])", union.group(1))
                names = [("null" if t == "NoneType" else t) or g for t, g in types]
                return f"--{key.group(1)}: expected {' or '.join(names)}, got {given.group(1)!r}"
            if key:
                reason = re.sub(r"<class '(\w+)'>", r"\1", reason or line)
                reason = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", reason)
                wrong = re.match(r"Expected an? (.*)\. Got value: (.*)", reason)
                if wrong and wrong.group(1) == "list":  # `--help` shows [ITEM,...]
                    reason = f"expected a list, such as 1,2 or [1,2], got {wrong.group(2)!r}"
                elif wrong:
                    reason = f"expected {wrong.group(1)}, got {wrong.group(2)!r}"
                return f"--{key.group(1)}: {reason}"
    return lines[0] if lines else "invalid command line (--help lists the options)"


def preset_names(command: str | None = None) -> list[str]:
    """The packaged presets (`configs/*.yaml`), or those of `command` only."""
    folder = resources.files(PACKAGE) / "configs"
    names = sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )
    return [n for n in names if command is None or preset_command(n) == command]


def preset_command(name: str) -> str:
    """The command a preset is for: its name's prefix (`finetune_vit_base_in1k`), else
    pretrain."""
    prefix = name.split("_", 1)[0]
    return prefix if prefix in ("finetune", "linprobe", "knn", "segment") else "pretrain"


def resolve_presets(argv: list[str]) -> list[str]:
    """`--config vit_base_in1k` -> the packaged YAML, when no such file exists here; a name
    that is neither a file nor a preset is a UsageError listing the presets."""
    resolved = list(argv)
    for i, arg in enumerate(resolved[:-1]):
        if arg == "--config" and Path(resolved[i + 1]).is_file():
            command = resolved[0] if resolved and resolved[0] in COMMANDS else None
            check_config_file(Path(resolved[i + 1]), COMMANDS[command].config if command else None)
        if arg == "--config" and not Path(resolved[i + 1]).exists():
            name = resolved[i + 1].removesuffix(".yaml")
            if name not in preset_names():
                raise UsageError(
                    f"--config {resolved[i + 1]}: no such file, and not a preset; presets: "
                    + ", ".join(preset_names())
                )
            command = resolved[0] if resolved and resolved[0] in COMMANDS else None
            if command is not None and preset_command(name) != command:
                raise UsageError(
                    f"--config {name} is a preset of `droppos {preset_command(name)}`, not of "
                    f"`droppos {command}`; {command}'s presets: "
                    + (", ".join(preset_names(command)) or "none")
                )
            resolved[i + 1] = str(resources.files(PACKAGE) / "configs" / f"{name}.yaml")
    return resolved


MAX_CONFIG_BYTES = 1 << 20


def check_config_file(path: Path, config: type | None = None) -> None:
    """A `--config` file droppos will read: a small YAML mapping without aliases, whose
    sections (of the command's `config`) are mappings. An alias (`*name`) lets a few lines
    expand to gigabytes ("billion laughs"), and no configuration needs one; an empty file would
    otherwise be reported as an empty "Unexpected config", and a section that is not a mapping
    (`optim: 5`, `model: [1]`) ends in a traceback or is dropped silently."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"--config {path}: {path.stat().st_size} bytes is not a config file")
    try:
        text = path.read_text(encoding="utf-8")
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
            raise UsageError(
                f"--config {path} uses YAML aliases (*name), which droppos does not expand: "
                "write the values out"
            )
    except (UnicodeDecodeError, yaml.YAMLError):
        return  # the parser reports it, with the line of the error
    if not text.strip():
        raise UsageError(f"--config {path} is empty: give a YAML file of options, or drop it")
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # the parser reports it, with the line of the error
    if not isinstance(content, dict):
        raise UsageError(f"--config {path}: expected a mapping of options, got {content!r:.60}")
    if config is not None:
        check_sections(content, config, "", path)


def check_sections(given: dict[Any, Any], config: type, where: str, path: Path) -> None:
    """Every section `given` names (a dataclass field of `config`) is itself a mapping."""
    try:
        hints = typing.get_type_hints(config)
    except (NameError, TypeError):
        hints = {}
    for option in fields(config):
        if option.name not in given:
            continue
        section = hints.get(option.name)
        if not (isinstance(section, type) and is_dataclass(section)):
            default = option.default
            if option.default_factory is not MISSING:
                default = option.default_factory()
            section = type(default) if is_dataclass(default) else None
        if section is None:
            continue
        value = given[option.name]
        if not isinstance(value, dict):
            raise UsageError(
                f"--config {path}: `{where}{option.name}` is a section: write its options "
                f"under it (`{option.name}:` then indented `name: value` lines), not {value!r:.60}"
            )
        check_sections(value, section, f"{where}{option.name}.", path)


def section_default(config_class: type, name: str) -> Any:
    for f in fields(config_class):
        if f.name == name:
            return f.default_factory() if f.default_factory is not MISSING else f.default
    raise KeyError(name)


def variants(config_class: type) -> dict[str, tuple[Callable[[], dict[str, Any]], str]]:
    """The sections of `config_class` that come in variants: field -> (variants, default)."""
    return {
        f.name: (f.metadata["variants"], f.metadata["default_variant"])
        for f in fields(config_class)
        if "variants" in f.metadata
    }


def chosen_variant(argv: list[str], section: str, default: str) -> str:
    """The `--SECTION.name` the command line asks for: the last one given, else the last
    `--config` file's, else `default`. It picks which configuration the parser offers."""
    name, option = default, f"--{section}.name"
    for i, arg in enumerate(argv):
        value = None
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"{option}="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            try:
                loaded = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
            except yaml.YAMLError:
                continue  # the parser reports it, with the file's name
            found = loaded.get(section) if isinstance(loaded, dict) else None
            value = found.get("name") if isinstance(found, dict) else None
        if value is not None:
            name = str(value)
    return name


def command_parser(command: str, chosen: dict[str, str] | None = None) -> ArgumentParser:
    """One command's options: a group per section of its configuration dataclass (or flat
    options for a configuration without sections)."""
    spec = COMMANDS[command]
    sub = Parser(description=spec.help)
    sub.add_argument(
        "--config",
        action=ActionConfigFile,
        help=f"YAML file or preset name ({', '.join(preset_names(command)) or 'none'})",
    )
    sections = sorted(  # the backbone or model first, `run` last, as a reader expects
        (f for f in fields(spec.config) if is_dataclass(section_default(spec.config, f.name))),
        key=lambda f: {"model": 0, "run": 2}.get(f.name, 1),
    )
    if not sections:
        sub.add_class_arguments(spec.config, None, fail_untyped=True)
        return sub
    for f in sections:
        default = section_default(spec.config, f.name)
        choices = variants(spec.config).get(f.name)
        if choices is not None:
            options, fallback = choices
            name = (chosen or {}).get(f.name, fallback)
            default = options()[name if name in options() else fallback]()
        sub.add_class_arguments(type(default), f.name, default=default, fail_untyped=True)
        if choices is not None:
            name_option(sub, f.name, list(options()))
    return sub


def name_option(parser: ArgumentParser, section: str, names: list[str]) -> None:
    """`--SECTION.name` in `--help`: every variant, and how to see another's options."""
    action = next(a for a in parser._actions if f"--{section}.name" in a.option_strings)
    action.metavar = "{" + ",".join(names) + "}"
    action.type_in_help = "one of " + ", ".join(names)
    action.help = (
        f"Which variant this section configures; the options listed here are {action.default}'s "
        f"(`--{section}.name NAME --help` lists another's)."
    )


def build_parser(chosen: dict[str, str] | None = None) -> ArgumentParser:
    parser = Parser(
        prog=PACKAGE,
        description="DropPos: pre-train Vision Transformers by reconstructing dropped positions.",
    )
    parser.add_argument("--version", action="version", version=f"{PACKAGE} {__version__}")
    commands = parser.add_subcommands(dest="command", required=True)
    for name, spec in COMMANDS.items():
        commands.add_subcommand(name, command_parser(name, chosen), help=spec.help)
    return parser


def parser_for(argv: list[str]) -> ArgumentParser:
    """The parser that fits `argv` (a section with variants follows its `--SECTION.name`)."""
    chosen: dict[str, str] = {}
    if argv and argv[0] in COMMANDS:
        for section, (options, default) in variants(COMMANDS[argv[0]].config).items():
            name = chosen_variant(argv, section, default)
            if name not in options():
                raise ValueError(
                    f"--{section}.name {name!r} is not a pre-training model; choose one of: "
                    + ", ".join(options())
                )
            chosen[section] = name
    return build_parser(chosen)


LIST_METAVAR = "[ITEM,...]"  # what `--help` shows for a list option


def bracket_lists(argv: list[str], parser: ArgumentParser) -> list[str]:
    """`--probe.base_lrs 3,10` as `--probe.base_lrs [3,10]`: a list option takes the
    comma-separated values its `--help` line ([ITEM,...]) shows, brackets or not."""
    subcommands = parser._subcommands_action._name_parser_map  # type: ignore[attr-defined]
    sub = subcommands.get(argv[0]) if argv else None
    if sub is None:
        return argv
    lists = {o for a in sub._actions if a.metavar == LIST_METAVAR for o in a.option_strings}
    out = list(argv)
    for i, arg in enumerate(out):
        option, equals, value = arg.partition("=")
        if equals and option in lists and "," in value and not value.startswith("["):
            out[i] = f"{option}=[{value}]"
        elif i and out[i - 1] in lists and "," in arg and not arg.startswith(("[", "-")):
            out[i] = f"[{arg}]"
    return out


def to_config(parser: ArgumentParser, args: Namespace, command: str) -> Any:
    """The subcommand's namespace -> its typed configuration dataclass."""
    config_class = COMMANDS[command].config
    instantiated = parser.instantiate(args)[command]
    return config_class(**{f.name: instantiated[f.name] for f in fields(config_class)})


def fail(command: str, error: BaseException, exit_code: int = 2) -> int:
    print(f"{PACKAGE} {command}: error: {one_line(error)}", file=sys.stderr)
    return exit_code


def one_line(error: BaseException) -> str:
    """The line of an error a user needs. A loader worker's error arrives with the worker's
    traceback folded into its message: keep its last line, without the exception's name."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if len(lines) > 1 else lines[0]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", line)


def output_folder(config: Any) -> Path | None:
    run = getattr(config, "run", None)
    return Path(run.output_dir) if getattr(run, "output_dir", None) else None


def remove_if_untouched(folder: Path | None) -> None:
    """Remove an output folder a failed command made and left holding nothing but droppos's
    marker: a refused command leaves no trace (a folder that was there before is kept)."""
    if folder is None or not folder.is_dir():
        return
    if all(p.name == RUN_MARKER for p in folder.iterdir()):
        with contextlib.suppress(OSError):
            (folder / RUN_MARKER).unlink(missing_ok=True)
            folder.rmdir()


def run_command(command: str, config: Any) -> int:
    """Run one command and print its last line: the exit status, every failure one line.

    A user mistake is 2; a stop asked for with a signal is 0 (resumable); a fault of the data,
    the disk or the optimisation is 1. A failed command removes the output folder it made, when
    it wrote nothing there.
    """
    folder = output_folder(config)
    new_folder = folder if folder is not None and not folder.exists() else None
    code = run_and_report(command, config)
    if code != 0:
        remove_if_untouched(new_folder)
    return code


def run_and_report(command: str, config: Any) -> int:
    try:
        line = COMMANDS[command].run(config)
    except RunStopped as stop:
        if stop.exit_code == 0:
            print(f"{PACKAGE} {command}: {stop}", flush=True)
            return 0
        return fail(command, stop, stop.exit_code)
    except BadImageError as error:
        return fail(command, error, 1)
    except (ValueError, FileNotFoundError) as error:
        return fail(command, error)
    except RuntimeError as error:
        if "DataLoader timed out" not in str(error):
            raise
        timeout = config.data.timeout
        message = f"a data loader worker took more than --data.timeout {timeout:g} s on one batch"
        return fail(command, RuntimeError(message), 1)
    if line:
        print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["pretrain"]  # no options: the demo
    command = argv[0] if argv[0] in COMMANDS else "command"
    try:
        argv = resolve_presets(argv)
        parser = parser_for(argv)
        args = parser.parse_args(bracket_lists(argv, parser))
        config = to_config(parser, args, args.command)
    except (UsageError, ValueError) as error:
        return fail(command, error)
    try:
        return run_command(args.command, config)
    finally:
        shutdown_distributed()


def console() -> int:
    """The `droppos` executable: `main`, and a second Ctrl-C (which interrupts a run at once,
    without the save the first one asked for) as one line and exit status 130, the shell's
    code for an interrupt, instead of a traceback."""
    argv = sys.argv[1:]
    try:
        return main(argv)
    except KeyboardInterrupt:
        command = argv[0] if argv and argv[0] in COMMANDS else "command"
        print(
            f"{PACKAGE} {command}: interrupted at once (a second Ctrl-C): nothing was saved "
            "since the last checkpoint, which the same command resumes from",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(console())
