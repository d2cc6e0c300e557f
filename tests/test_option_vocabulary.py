"""One spelling per concept: every command's `--help`, walked as a user reads it.

A user who learnt `--model.checkpoint` on `knn` types it on `export` too; an option is a section
and a name (`--data.source`), and the same name means the same thing in every command.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from droppos.cli.main import COMMANDS, main
from droppos.methods import method_names

# Names that are spelled in two sections because they are two things: a probe's optimisation on
# cached features (`--probe.*`) is not the network's (`--optim.*`), and a feature-extraction
# batch (`--data.batch_size`) is not an optimiser's. Nested sub-models (`--model.encoder.*`,
# `--model.decoder.*`) have shapes of their own and are not compared.
TWO_THINGS = {
    "batch_size": {"--data.batch_size", "--optim.batch_size", "--probe.batch_size"},
    "epochs": {"--optim.epochs", "--probe.epochs"},
    "lr": {"--optim.lr", "--probe.lr"},
    "name": {"--model.name", "--head.name"},  # which variant: the method, the segmentation head
    "warmup_epochs": {"--optim.warmup_epochs", "--probe.warmup_epochs"},
    "weight_decay": {"--optim.weight_decay", "--probe.weight_decay"},
}
# What every command that reads or writes these spells the same way.
SHARED = {
    "checkpoint": "--model.checkpoint",
    "source": "--data.source",
    "output_dir": "--run.output_dir",
    "seed": "--run.seed",
    "device": "--run.device",
    "num_heads": "--model.num_heads",
}
OWN = {"--help", "--config", "--print_config"}


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def every_help(capsys) -> dict[str, str]:
    """The help text of every command (pre-training: of every method)."""
    texts = {}
    for command in COMMANDS:
        if command == "pretrain":
            for method in method_names():
                texts[f"pretrain:{method}"] = help_of([command, "--model.name", method], capsys)
        else:
            texts[command] = help_of([command], capsys)
    return texts


def options_in(text: str) -> set[str]:
    listed = re.findall(r"^\s+(--[\w.]+)", text, flags=re.MULTILINE)
    return {o for o in listed if o not in OWN and not text_says_config_file(o, text)}


def text_says_config_file(option: str, text: str) -> bool:
    """`--model CONFIG` (a whole section from a file) is not an option of its own."""
    return re.search(rf"^\s+{re.escape(option)} CONFIG\s", text, flags=re.MULTILINE) is not None


def test_every_option_is_a_section_and_a_name(capsys):
    for command, text in every_help(capsys).items():
        options = options_in(text)
        assert options, command
        flat = sorted(o for o in options if "." not in o)
        assert not flat, f"{command} has options outside a section: {flat}"


def test_each_name_has_one_spelling_across_commands(capsys):
    spellings: dict[str, set[str]] = defaultdict(set)
    where: dict[str, set[str]] = defaultdict(set)
    for command, text in every_help(capsys).items():
        for option in options_in(text):
            if option.count(".") > 1:  # a nested sub-model's own shape
                continue
            spellings[option.rsplit(".", 1)[-1]].add(option)
            where[option].add(command)
    for name, spelt in spellings.items():
        if name in TWO_THINGS:
            assert spelt <= TWO_THINGS[name], (name, spelt)
            continue
        assert len(spelt) == 1, f"{name} is spelt {sorted(spelt)}: " + ", ".join(
            f"{o} in {sorted(where[o])}" for o in sorted(spelt)
        )
    for name, option in SHARED.items():
        assert spellings[name] == {option}, (name, spellings[name])
    assert where["--model.checkpoint"] >= {
        "finetune", "linprobe", "knn", "probe-position", "order-sensitivity", "visualize", "export",
    }  # fmt: skip
    assert {"visualize", "write-shards"} <= where["--data.source"]
    assert {"visualize", "export", "write-shards"} <= where["--run.output_dir"]


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["visualize", "--checkpoint", "x.pth"], "--model.checkpoint"),
        (["export", "--output", "out"], "--run.output_dir"),
        (["write-shards", "--source", "demo"], "--data.source"),
        (["visualize", "--images", "3"], "--data.images"),
        (["export", "--timm_name", "vit_small_patch16_224"], "--model.timm_name"),
        (["pretrain", "--optim.e", "3"], "--optim.epochs"),
        (["pretrain", "--optm.epochs", "3"], "--optim.epochs"),
        (["knn", "--run.checkpoint", "x.pth"], "--model.checkpoint"),
    ],
)
def test_an_old_or_misplaced_spelling_points_at_the_one_that_works(argv, meant, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"did you mean {meant}? (--help lists them)"), error
    assert len(error.splitlines()) == 1
