"""`droppos <command>`: typed options from dataclasses, YAML presets, one-line user errors.

jsonargparse turns each command's configuration dataclass into options (`--optim.epochs 10`),
reads YAML (`--config configs/vit_base_in1k.yaml`, or just the preset's name), and prints every
option with its default and a one-line description in `--help`. The model section of `pretrain`
is the chosen model's own config (`--model.name droppos|mae`), so every option reaches the model
and an option of the other model is an error, not silently ignored.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from droppos.engine.config import PRETRAIN_MODELS, PretrainConfig, demo_model
from droppos.evaluation.config import (
    ExportConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    OrderSensitivityConfig,
    PositionProbeConfig,
    VisualizeConfig,
    WriteShardsConfig,
)

set_parsing_settings(docstring_parse_attribute_docstrings=True)

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "Pre-train a ViT with DropPos (default: the built-in demo)."),
    "finetune": (FinetuneConfig, "Fine-tune a checkpoint end to end for classification."),
    "linprobe": (LinprobeConfig, "Linear probe on frozen features (a sweep of learning rates)."),
    "knn": (KnnConfig, "Weighted kNN classification on frozen features."),
    "probe-position": (
        PositionProbeConfig,
        "How well a frozen backbone knows where its patches are (linear position probe).",
    ),
    "order-sensitivity": (
        OrderSensitivityConfig,
        "Top-1 of a fine-tuned classifier with intact, shuffled and position-less inputs.",
    ),
    "visualize": (VisualizeConfig, "Pictures of the jigsaw a DropPos checkpoint solves."),
    "write-shards": (WriteShardsConfig, "Write a data source as WebDataset-style tar shards."),
    "export": (
        ExportConfig,
        "Export a checkpoint for timm, Detectron2 ViTDet and MMSegmentation.",
    ),
}
FLAT_COMMANDS = ("export", "visualize", "write-shards")  # options without sections


class UsageError(Exception):
    """A command-line mistake, as one line (the usage is for `--help`)."""


class Parser(ArgumentParser):
    """jsonargparse without prefix abbreviations, whose errors are one line, not a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise UsageError(usage_line(message, self))


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
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown option {option}{hint} (--help lists them)"
    for line in lines:  # a wrong value: jsonargparse names the key, then the reason
        if line.startswith(("Parser key", "Key ")):
            key = re.search(r'"([\w.]+)"', line)
            reason = next(
                (x for x in lines if x.startswith(("Expected", "Given value", "Does not"))), ""
            )
            if key:
                reason = re.sub(r"<class '(\w+)'>", r"\1", reason or line)
                reason = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", reason)
                wrong = re.match(r"Expected an? (.*)\. Got value: (.*)", reason)
                if wrong:
                    reason = f"expected {wrong.group(1)}, got {wrong.group(2)!r}"
                return f"--{key.group(1)}: {reason}"
    return lines[0] if lines else "invalid command line (--help lists the options)"


def preset_names() -> list[str]:
    folder = resources.files("droppos") / "configs"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def resolve_presets(argv: list[str]) -> list[str]:
    """`--config vit_base_in1k` -> the packaged YAML, when no such file exists here; a name
    that is neither a file nor a preset is a UsageError listing the presets."""
    resolved = list(argv)
    for i, arg in enumerate(resolved[:-1]):
        if arg == "--config" and not Path(resolved[i + 1]).exists():
            name = resolved[i + 1].removesuffix(".yaml")
            if name not in preset_names():
                raise UsageError(
                    f"--config {resolved[i + 1]}: no such file, and not a preset; presets: "
                    + ", ".join(preset_names())
                )
            resolved[i + 1] = str(resources.files("droppos") / "configs" / f"{name}.yaml")
    return resolved


def pretrain_model_name(argv: list[str]) -> str:
    """The `model.name` the command line asks for: the last `--model.name`, else the last
    `--config` file's, else droppos. It picks which model config the parser offers."""
    name = "droppos"
    for i, arg in enumerate(argv):
        value = None
        if arg == "--model.name" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--model.name="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            try:
                loaded = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
            except yaml.YAMLError:
                continue  # the parser reports it, with the file's name
            model = loaded.get("model") if isinstance(loaded, dict) else None
            value = model.get("name") if isinstance(model, dict) else None
        if value is not None:
            name = str(value)
    return name


def section_default(config_class: type, name: str) -> Any:
    for f in fields(config_class):
        if f.name == name:
            return f.default_factory() if f.default_factory is not MISSING else f.default
    raise KeyError(name)


def command_parser(command: str, model_name: str = "droppos") -> ArgumentParser:
    """One command's options: a group per section of its configuration dataclass."""
    config_class, help_text = COMMANDS[command]
    sub = Parser(description=help_text)
    sub.add_argument(
        "--config",
        action=ActionConfigFile,
        help=f"YAML file or preset name ({', '.join(preset_names())})",
    )
    if command in FLAT_COMMANDS:
        sub.add_class_arguments(config_class, None, fail_untyped=True)
        return sub
    for f in fields(config_class):
        section_class = type(section_default(config_class, f.name))
        default = section_default(config_class, f.name)
        if command == "pretrain" and f.name == "model":
            section_class = PRETRAIN_MODELS.get(model_name, section_class)
            default = demo_model(model_name if model_name in PRETRAIN_MODELS else "droppos")
        sub.add_class_arguments(section_class, f.name, default=default, fail_untyped=True)
    return sub


def build_parser(model_name: str = "droppos") -> ArgumentParser:
    parser = Parser(
        prog="droppos",
        description="DropPos: pre-train Vision Transformers by reconstructing dropped positions.",
    )
    commands = parser.add_subcommands(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_subcommand(name, command_parser(name, model_name), help=help_text)
    return parser


def parser_for(argv: list[str]) -> ArgumentParser:
    """The parser that fits `argv` (its pretrain model section follows `--model.name`)."""
    name = pretrain_model_name(argv)
    if argv and argv[0] == "pretrain" and name not in PRETRAIN_MODELS:
        raise ValueError(
            f"--model.name {name!r} is not a pre-training model; choose one of: "
            + ", ".join(PRETRAIN_MODELS)
        )
    return build_parser(name)


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


def fail(command: str, error: BaseException, exit_code: int = 2) -> int:
    print(f"droppos {command}: error: {one_line(error)}", file=sys.stderr)
    return exit_code


def one_line(error: BaseException) -> str:
    """The line of an error a user needs. A loader worker's error arrives with the worker's
    traceback folded into its message: keep its last line, without the exception's name."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if len(lines) > 1 else lines[0]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", line)


def start_training(
    parser: ArgumentParser, args: Namespace, command: str, setup: Any, what: str
) -> Any:
    """Set a training run up; say what it will do (or that it already finished). None when
    there is nothing left to train."""
    config = to_config(parser, args, command)
    loop = setup(config)
    if not loop.env.is_main:
        return loop
    out = loop.output_dir
    if loop.finished:
        loop.close()
        print(
            f"droppos {command}: the run in {out} already finished its {loop.optim.epochs} "
            "epochs; its outputs are left as they are (raise --optim.epochs to continue it, "
            "or choose another --run.output_dir)"
        )
        return None
    write_resolved_config(parser, args, command, out)
    resumed = ""
    if loop.resumed_from is not None:
        resumed = f"; resuming at epoch {loop.position.epoch + 1}, step {loop.position.step}"
    print(
        f"{what} ({loop.env.world_size} process(es), {loop.env.device}, {loop.precision}); "
        f"outputs in {out}{resumed}",
        flush=True,
    )
    for note in loop.notes:
        print(f"note: {note}", flush=True)
    return loop


def run_training(
    parser: ArgumentParser, args: Namespace, command: str, setup: Any, train: Any, what: str
) -> tuple[int, Any, Any]:
    """Set up, train and stop cleanly: (exit status, loop, what `train` returned).

    Every way a run can end early becomes one line: a user mistake (2), a stop the user asked
    for with a signal (0, resumable), a fault of the data, the disk or the optimisation (1).
    """
    from droppos.data import BadImageError
    from droppos.engine.guards import RunStopped

    try:
        loop = start_training(parser, args, command, setup, what)
    except (ValueError, FileNotFoundError) as error:
        return fail(command, error), None, None
    if loop is None:
        return 0, None, None
    try:
        return 0, loop, train(loop)
    except RunStopped as stop:
        if stop.exit_code == 0:
            print(f"droppos {command}: {stop}", flush=True)
            return 0, loop, None
        return fail(command, stop, stop.exit_code), loop, None
    except BadImageError as error:
        return fail(command, error, 1), loop, None
    except RuntimeError as error:
        if "DataLoader timed out" not in str(error):
            raise
        timeout = args[command].data.timeout
        message = f"a data loader worker took more than --data.timeout {timeout:g} s on one batch"
        return fail(command, RuntimeError(message), 1), loop, None
    finally:
        loop.close()


def run_pretrain(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.engine.pretrain import setup

    section = args.pretrain
    what = f"pre-training {section.model.name} on {section.data.source}"
    status, loop, summary = run_training(
        parser, args, "pretrain", setup, lambda loop: loop.run(), what
    )
    if summary is None or not loop.env.is_main:
        return status
    done = f"done in {summary['wall_seconds']:.0f} s: "
    if "position_accuracy" in summary:
        chance = summary["chance_position_accuracy"]
        print(f"{done}position accuracy on dropped tokens {summary['position_accuracy']:.3f} "
              f"(chance {chance:.3f})")  # fmt: skip
    else:
        print(f"{done}loss {summary['loss']:.4f}")
    return status


def run_finetune(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.evaluation.finetune import setup, train

    section = args.finetune
    what = f"fine-tuning {section.model.checkpoint} on {section.data.source}"
    status, loop, results = run_training(parser, args, "finetune", setup, train, what)
    if results is None or not loop.env.is_main:
        return status
    print(
        f"done: val top-1 {results['top1']:.2f}, top-5 {results['top5']:.2f} "
        f"(best top-1 {results['best_top1']:.2f} at epoch {results['best_epoch']}); "
        f"{loop.output_dir / 'results.json'}"
    )
    return status


def evaluation_setup(parser: ArgumentParser, args: Namespace, command: str) -> Any:
    """The shared start of the evaluations: config, process group, device, precision, seed."""
    import torch

    from droppos.engine.distributed import init_distributed
    from droppos.engine.logging import show_progress
    from droppos.engine.precision import resolve_precision

    config = to_config(parser, args, command)
    config.validate()
    env = init_distributed(config.run.device)
    precision = resolve_precision(config.run.precision, env.device)
    torch.manual_seed(config.run.seed)
    return config, env, precision, show_progress(config.run.progress, env.is_main)


def _frozen_features(parser: ArgumentParser, args: Namespace, command: str) -> Any:
    """The shared start of knn and linprobe: the setup, then the features, extracted once."""
    from droppos.evaluation.features import frozen_features

    config, env, precision, progress = evaluation_setup(parser, args, command)
    features = frozen_features(config.model, config.data, env.device, precision, progress)
    if env.is_main:
        write_resolved_config(parser, args, command, Path(config.run.output_dir))
    return config, env, features


def run_probe_position(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.evaluation.position_probe import position_probe

    try:
        config, env, precision, progress = evaluation_setup(parser, args, "probe-position")
        write_resolved_config(parser, args, "probe-position", Path(config.run.output_dir))
        results = position_probe(config, env.device, precision, progress)
    except (ValueError, FileNotFoundError) as error:
        return fail("probe-position", error)
    print(
        f"position probe of {results['checkpoint']} ({results['drop_ratio']:g} of positions "
        f"dropped, {len(results['seeds'])} seeds): top-1 {results['top1']:.2f} +- "
        f"{results['top1_std']:.2f} (chance {results['chance_top1']:.2f}), within one cell "
        f"{results['within_one_cell']:.2f}, mean error distance "
        f"{results['mean_error_distance']:.2f} cells; "
        f"{Path(config.run.output_dir) / 'results.json'}"
    )
    return 0


def run_order_sensitivity(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.data import build_loader
    from droppos.evaluation.backbone import backbone_from
    from droppos.evaluation.datasets import eval_view, labelled_splits
    from droppos.evaluation.order_sensitivity import order_sensitivity
    from droppos.evaluation.report import write_results
    from droppos.interop.checkpoints import build_vit

    try:
        config, env, precision, _ = evaluation_setup(parser, args, "order-sensitivity")
        backbone = backbone_from(config.model)
        if backbone.num_classes == 0:
            raise ValueError(
                f"{backbone.source} has no classifier head; order-sensitivity needs a fine-tuned "
                "checkpoint (droppos finetune writes best.pth)"
            )
        vit = build_vit(
            backbone, num_classes=backbone.num_classes, global_pool=backbone.global_pool
        )
        val = eval_view(labelled_splits(config.data).val, config.data, backbone)
        loader = build_loader(
            val,
            config.data.batch_size,
            shuffle=False,
            num_workers=config.data.num_workers,
            device_type=env.device.type,
        )
        results = order_sensitivity(
            vit.to(env.device), loader, env.device, precision, config.order.tiles, config.run.seed
        )
    except (ValueError, FileNotFoundError) as error:
        return fail("order-sensitivity", error)
    results.update(checkpoint=backbone.source, checkpoint_kind=backbone.kind)
    write_results(config.run.output_dir, "order-sensitivity", results)
    rows = "\n".join(f"| {c} | {v:.2f} |" for c, v in results["top1"].items())
    print(f"top-1 of {backbone.source} on {results['images']} images:\n"
          f"| input | top-1 |\n|---|---|\n{rows}")  # fmt: skip
    return 0


def run_visualize(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.engine.distributed import resolve_device
    from droppos.visual.jigsaw import visualize_checkpoint

    try:
        config = to_config(parser, args, "visualize")
        config.validate()
        paths = visualize_checkpoint(
            config.checkpoint, config.source, config.images, config.output, config.seed,
            resolve_device(config.device),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        return fail("visualize", error)
    print(f"{len(paths)} pictures in {config.output}: {', '.join(p.name for p in paths)}")
    return 0


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
    from droppos.interop.export import export_checkpoint

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


def run_write_shards(parser: ArgumentParser, args: Namespace) -> int:
    from droppos.data.shards import write_shards

    try:
        config = to_config(parser, args, "write-shards")
        config.validate()
        written = write_shards(config.source, config.output, config.shard_size)
    except (ValueError, FileNotFoundError) as error:
        return fail("write-shards", error)
    said = ", ".join(f"{split}: {len(paths)} shard(s)" for split, paths in written.items())
    print(f"wrote {config.source} to {config.output} ({said}); train on it with "
          f"--data.source {config.output}")  # fmt: skip
    return 0


RUNNERS = {
    "pretrain": run_pretrain,
    "finetune": run_finetune,
    "linprobe": run_linprobe,
    "knn": run_knn,
    "export": run_export,
    "probe-position": run_probe_position,
    "order-sensitivity": run_order_sensitivity,
    "visualize": run_visualize,
    "write-shards": run_write_shards,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["pretrain"]  # no options: the demo
    command = argv[0] if argv[0] in COMMANDS else "command"
    try:
        argv = resolve_presets(argv)
        parser = parser_for(argv)
        args = parser.parse_args(argv)
    except (UsageError, ValueError) as error:
        return fail(command, error)
    try:
        return RUNNERS[args.command](parser, args)
    finally:
        from droppos.engine.distributed import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
