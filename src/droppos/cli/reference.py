"""The configuration reference: every command's options as Markdown, read off the same parsers
that `--help` prints, so the documentation site's page cannot drift from the command line."""

from __future__ import annotations

import html
from argparse import Action, ArgumentParser

from droppos.cli.main import COMMANDS, command_parser, variants

SKIPPED = ("_HelpAction", "_ActionPrintConfig", "_ActionConfigLoad")  # -h, --print_config, --model


def cell(text: str) -> str:
    """One table cell: one line, Markdown's `|` and HTML's `<` escaped."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def option_row(parser: ArgumentParser, action: Action) -> str:
    metavar = f" {action.metavar}" if isinstance(action.metavar, str) else ""
    described = parser._get_formatter()._expand_help(action) if action.help else ""  # as --help
    return f"| `{cell(action.option_strings[-1] + metavar)}` | {cell(described)} |"


def section_of(group: object) -> str:
    """The configuration section a group of options belongs to (`--model.encoder.depth` ->
    model; the command's own options: `--config` -> config)."""
    actions = [a for a in group._group_actions if a.option_strings]  # type: ignore[attr-defined]
    first = actions[0].option_strings[-1].removeprefix("--") if actions else ""
    return first.split(".")[0]  # `--model` (the section's own YAML) or `--model.name`


def groups_markdown(parser: ArgumentParser, sections: set[str] | None, level: str) -> list[str]:
    """The tables of `parser`'s option groups (those of `sections` only, when given)."""
    out: list[str] = []
    for group in parser._action_groups:
        actions = [
            a for a in group._group_actions if a.option_strings and type(a).__name__ not in SKIPPED
        ]
        if not actions or (sections is not None and section_of(group) not in sections):
            continue
        title = group.title if group.title not in ("options", None) else "Command options"
        out += [f"{level} {cell(title)}", "", "| option | meaning (type, default) |", "|---|---|"]
        out += [option_row(parser, a) for a in actions]
        out.append("")
    return out


def reference_markdown() -> str:
    """Every command of `COMMANDS` with each option's meaning, type and default, as `--help`
    gives them; a section that comes in variants (pretrain's `--model.name`) gets one table per
    variant."""
    out = [
        "# Configuration reference",
        "",
        "Every option of every command, with its type and default, generated from the same",
        "configuration dataclasses as `droppos COMMAND --help` (which prints the same text).",
        "Options are set on the command line (`--optim.epochs 20`) or in a YAML file given to",
        "`--config` (a file, or the name of a packaged preset), and every run writes the values it",
        "used to `config.yaml` in its output folder.",
        "",
    ]
    for name, spec in COMMANDS.items():
        out += [f"## {name}", "", spec.help, "", f"```bash\ndroppos {name} --help\n```", ""]
        out += groups_markdown(command_parser(name), None, "###")
        for section, (options, default) in variants(spec.config).items():
            for variant in options():
                if variant == default:
                    continue
                out += [f"### `--{section}.name {variant}`", ""]
                out += groups_markdown(command_parser(name, {section: variant}), {section}, "####")
    return "\n".join(out)
