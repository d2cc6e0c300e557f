"""Every question about how the model is distributed is asked of the strategy
(`engine/strategy.py`): no code outside the engine tests a strategy's name or peeks at the model
for FSDP's methods, and each list of choices is written once."""

from __future__ import annotations

import contextlib
import re
import typing
from pathlib import Path

import pytest

from droppos.cli.main import main
from droppos.data.decode import DECODE_MODES, DecodeMode
from droppos.engine import loop as loop_module
from droppos.engine import strategy as strategy_module
from droppos.engine.strategy import STRATEGIES, SingleProcess
from droppos.evaluation.finetune import FinetuneConfig
from droppos.methods.pretrain import PretrainDataSection
from droppos.sections import TrainRunSection
from tests.test_monitors import tiny

SRC = Path(__file__).parents[1] / "src" / "droppos"


class RecordingStrategy(SingleProcess):
    """One process, as `SingleProcess`, remembering what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @contextlib.contextmanager
    def gathered(self, model):
        self.asked.append("gathered")
        with super().gathered(model) as whole:
            yield whole


def test_the_monitors_ask_the_strategy_for_the_whole_model(tmp_path, image_folder, monkeypatch):
    fake = RecordingStrategy()
    monkeypatch.setattr(loop_module, "strategy_for", lambda *args: fake)
    args = tiny(tmp_path / "run", image_folder, "--run.monitor_every", "1", "--optim.epochs", "1")
    assert main([*args, "--run.pictures_every", "0"]) == 0
    assert fake.asked == ["gathered"]  # once: the one monitored epoch


def test_fine_tuning_asks_the_strategy_whether_it_holds_a_whole_model(monkeypatch):
    config = FinetuneConfig()
    config.model.ema = True
    config.run.strategy = "ddp"
    config.validate()  # a DDP rank holds a whole replica: the EMA can copy it

    class ShardingDDP(SingleProcess):
        sharded = True

    monkeypatch.setitem(strategy_module._CLASSES, "ddp", ShardingDDP)
    with pytest.raises(ValueError, match="strategy ddp does not hold"):
        config.validate()


def test_each_list_of_choices_is_written_once():
    hints = typing.get_type_hints(TrainRunSection)
    assert typing.get_args(hints["strategy"]) == STRATEGIES
    assert set(strategy_module._CLASSES) == set(STRATEGIES)
    assert typing.get_type_hints(PretrainDataSection)["decode"] == DecodeMode
    assert typing.get_args(DecodeMode) == DECODE_MODES


def test_no_code_outside_the_engine_asks_which_strategy_runs():
    peeking = re.compile(r"strategy\s*[!=]=|[\"']fsdp[\"']|hasattr\([^)]*[\"'](un|re)shard[\"']")
    found = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if path.parent.name != "engine" and path.name != "sections.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if peeking.search(line)
    ]
    assert not found, found
