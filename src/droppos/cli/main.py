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
from droppos.evaluation.config import ExportConfig, FinetuneConfig, KnnConfig, LinprobeConfig

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "Pre-train a ViT with DropPos (default: the built-in demo)."),
    "finetune": (FinetuneConfig, "Fine-tune a checkpoint end to end for classification."),
    "linprobe": (LinprobeConfig, "Linear probe on frozen features (a sweep of learning rates)."),
    "knn": (KnnConfig, "Weighted kNN classification on frozen features."),
    "export": (
        ExportConfig,
        "Export a checkpoint for timm, Detectron2 ViTDet and MMSegmentation.",
    ),
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


def write_resolved_config(parser: ArgumentParser, args: Namespace, command: str, out: Path) -> None:
    """`out/config.yaml`: every option as resolved, to pass back with `--config`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(parser, args, command))


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
        write_resolved_config(parser, args, "pretrain", out)
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


def run_finetune(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.evaluation.finetune import setup, train

    try:
        config = to_config(parser, args, "finetune")
        run = setup(config)
    except (ValueError, FileNotFoundError) as error:
        return fail("finetune", error)
    out = Path(config.run.output_dir)
    if run.env.is_main:
        write_resolved_config(parser, args, "finetune", out)
        print(
            f"fine-tuning {run.backbone.source} ({run.backbone.kind}) on {config.data.source}, "
            f"{run.num_classes} classes ({run.env.world_size} process(es), {run.env.device}, "
            f"{run.precision}); outputs in {out}"
            + (f"; resuming at epoch {run.epoch + 1}" if run.epoch or run.batch else ""),
            flush=True,
        )
    results = train(run)
    if run.env.is_main:
        print(
            f"done: val top-1 {results['top1']:.2f}, top-5 {results['top5']:.2f} "
            f"(best top-1 {results['best_top1']:.2f} at epoch {results['best_epoch']}); "
            f"{out / 'results.json'}"
        )
    return 0


def _frozen_features(parser: ArgumentParser, args: Namespace, command: str) -> Any:
    """The shared start of knn and linprobe: config, devices, then the features, extracted once."""
    import torch

    from droppos.engine.distributed import init_distributed
    from droppos.engine.precision import resolve_precision
    from droppos.evaluation.features import frozen_features

    config = to_config(parser, args, command)
    config.validate()
    env = init_distributed(config.run.device)
    precision = resolve_precision(config.run.precision, env.device)
    torch.manual_seed(config.run.seed)
    progress = config.run.progress and env.is_main
    features = frozen_features(config.model, config.data, env.device, precision, progress)
    if env.is_main:
        write_resolved_config(parser, args, command, Path(config.run.output_dir))
    return config, env, features


def run_knn(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.evaluation.knn import run_knn as knn

    try:
        config, env, features = _frozen_features(parser, args, "knn")
    except (ValueError, FileNotFoundError) as error:
        return fail("knn", error)
    results = knn(config, features)
    if env.is_main:
        print(
            f"kNN (k={config.knn.k}, T={config.knn.temperature}) on {config.model.feature} "
            f"features of {features.backbone.source}: top-1 {results['top1']:.2f}, "
            f"top-5 {results['top5']:.2f}; {Path(config.run.output_dir) / 'results.json'}"
        )
    return 0


def run_linprobe(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.evaluation.linprobe import run_linprobe as linprobe

    try:
        config, env, features = _frozen_features(parser, args, "linprobe")
    except (ValueError, FileNotFoundError) as error:
        return fail("linprobe", error)
    results = linprobe(config, features)
    if env.is_main:
        sweep = ", ".join(f"{r['base_lr']:g}: {r['top1']:.2f}" for r in results["probes"])
        print(
            f"linear probe on {config.model.feature} features of {features.backbone.source}: "
            f"top-1 {results['top1']:.2f}, top-5 {results['top5']:.2f} at base lr "
            f"{results['best_base_lr']:g} (sweep {sweep}); "
            f"{Path(config.run.output_dir) / 'results.json'}"
        )
    return 0


def run_export(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.interop.timm_export import export_checkpoint

    try:
        config = to_config(parser, args, "export")
        config.validate()
        files = export_checkpoint(
            config.checkpoint, config.output, config.timm_name, config.num_heads
        )
    except (ValueError, FileNotFoundError) as error:
        return fail("export", error)
    print(
        f"exported {config.checkpoint} to {files.folder}: {files.weights.name} + "
        f"{files.config.name} (timm {files.timm_name}), {files.mae_format.name} (Detectron2 "
        f"ViTDet / MAE), {files.mmseg_format.name} (MMSegmentation MAE)\n"
        f'load: timm.create_model("local-dir:{files.folder}", pretrained=True, num_classes=...)'
    )
    return 0


RUNNERS = {
    "pretrain": run_pretrain,
    "finetune": run_finetune,
    "linprobe": run_linprobe,
    "knn": run_knn,
    "export": run_export,
}


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
