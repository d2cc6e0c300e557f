"""`droppos <command>`: typed options from dataclasses, YAML presets, one-line user errors.

jsonargparse turns each command's configuration dataclass into options (`--optim.epochs 10`),
reads YAML (`--config configs/vit_base_in1k.yaml`, or just the preset's name), and prints every
option with its default in `--help`.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from droppos.engine.config import PretrainConfig

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "Pre-train a ViT with DropPos (default: the built-in demo)."),
}


def preset_names() -> list[str]:
    folder = resources.files("droppos") / "configs"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def resolve_presets(argv: list[str]) -> list[str]:
    """`--config vit_base_in1k` -> the packaged YAML, when no such file exists here."""
    resolved = list(argv)
    for i, arg in enumerate(resolved[:-1]):
        if arg == "--config" and not Path(resolved[i + 1]).exists():
            name = resolved[i + 1].removesuffix(".yaml")
            if name in preset_names():
                resolved[i + 1] = str(resources.files("droppos") / "configs" / f"{name}.yaml")
    return resolved


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="droppos",
        description="DropPos: pre-train Vision Transformers by reconstructing dropped positions.",
    )
    commands = parser.add_subcommands(dest="command", required=True)
    for name, (config_class, help_text) in COMMANDS.items():
        sub = ArgumentParser(description=help_text)
        sub.add_argument(
            "--config",
            action=ActionConfigFile,
            help=f"YAML file or preset name ({', '.join(preset_names())})",
        )
        sub.add_class_arguments(config_class, None, fail_untyped=True)
        commands.add_subcommand(name, sub, help=help_text)
    return parser


def to_config(parser: ArgumentParser, args: Namespace, command: str) -> Any:
    """The subcommand's namespace -> its typed configuration dataclass."""
    config_class = COMMANDS[command][0]
    instantiated = parser.instantiate(args)[command]
    return config_class(**{f.name: instantiated[f.name] for f in fields(config_class)})


def dump_config(parser: ArgumentParser, args: Namespace, command: str) -> str:
    sub = parser._subcommands_action._name_parser_map[command]
    section = args[command].clone()
    section.pop("config", None)
    return sub.dump(section)


def fail(command: str, error: BaseException) -> int:
    print(f"droppos {command}: error: {error}", file=sys.stderr)
    return 2


def run_pretrain(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.engine.pretrain import setup, train

    try:
        config = to_config(parser, args, "pretrain")
        trainer = setup(config)
    except (ValueError, FileNotFoundError) as error:
        return fail("pretrain", error)
    if trainer.env.is_main:
        out = Path(config.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(parser, args, "pretrain"))
        print(
            f"pre-training {config.model.name} on {config.data.source} "
            f"({trainer.env.world_size} process(es), {trainer.env.device}, {trainer.precision}); "
            f"outputs in {out}"
            + (
                f"; resuming at epoch {trainer.epoch + 1}" if trainer.epoch or trainer.batch else ""
            ),
            flush=True,
        )
    summary = train(trainer)
    if trainer.env.is_main and "position_accuracy" in summary:
        print(
            f"done in {summary['wall_seconds']:.0f} s: position accuracy on dropped tokens "
            f"{summary['position_accuracy']:.3f} (chance {summary['chance_position_accuracy']:.3f})"
        )
    return 0


RUNNERS = {"pretrain": run_pretrain}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = resolve_presets(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["pretrain"]  # the one command that runs with nothing else: the demo
    args = parser.parse_args(argv)
    try:
        return RUNNERS[args.command](parser, args)
    finally:
        from droppos.engine.distributed import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
