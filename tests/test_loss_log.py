"""Losses read from the device every few steps give the same run as reading every step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from genctr_rec.training import loss_log
from genctr_rec.training.loss_log import LossLog


class _Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))


def test_losses_are_read_every_n_steps_and_before_anything_needs_them() -> None:
    writer, acc = _Writer(), {"total": 0.0, "count": 0}
    log = LossLog(torch.device("cpu"), writer, read_every=3)
    assert LossLog(torch.device("cpu")).read_every == 1
    assert LossLog(torch.device("cuda")).read_every == loss_log.CUDA_READ_EVERY > 1
    assert [log.add(torch.tensor(v), 0, s, acc) for s, v in enumerate([1.0, 2.0])] == [0, 0]
    assert acc["count"] == 0 and writer.scalars == []  # nothing read yet
    assert log.add(torch.tensor(3.0), 0, 2, acc)
    assert acc == {"total": 6.0, "count": 3}
    assert writer.scalars == [("train/loss", v, s + 1) for s, v in enumerate([1.0, 2.0, 3.0])]
    log.add(torch.tensor(4.0), 0, 3, acc)
    log.flush(acc)  # before a validation, a checkpoint, the epoch's end
    log.flush(acc)  # nothing pending: nothing changes
    assert acc == {"total": 10.0, "count": 4}


def test_a_nan_is_named_by_its_own_step_when_read_later() -> None:
    acc = {"total": 0.0, "count": 0}
    log = LossLog(torch.device("cpu"), read_every=5)
    log.add(torch.tensor(1.0), 2, 40, acc)
    log.add(torch.tensor(math.nan), 2, 41, acc)
    log.add(torch.tensor(1.0), 2, 42, acc)
    with pytest.raises(FloatingPointError, match="nan at epoch 2, step 41"):
        log.flush(acc)


def test_a_run_reading_every_seventh_step_is_the_same_run(toy_synth, tmp_path, monkeypatch):
    """Pre-training with the loss read every 7 steps (as on CUDA, where every 20), stopped
    after step 13 (its last losses still unread when the checkpoint is written) and resumed,
    records the same epoch losses and validation as reading every step without a stop."""
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.pretrain import pretrain

    logs = []

    def run(out, read_every, stops=()):
        original = LossLog.__init__

        def init(self, device, writer=None, _=None):
            original(self, device, writer, read_every)
            logs.append(self)

        monkeypatch.setattr(LossLog, "__init__", init)
        train = TrainConfig(epochs=2, batch_size=32, seed=1, checkpoint_every=5)
        cfg = RunConfig("pretrain", str(toy_synth), ModelConfig(), train)
        for stop in stops:
            assert pretrain(cfg, out, stop_after_steps=stop) is None
        pretrain(cfg, out)
        monkeypatch.setattr(LossLog, "__init__", original)
        return json.loads((out / "metrics.json").read_text())

    every = run(tmp_path / "every", 1)
    seventh = run(tmp_path / "seventh", 7, stops=(13,))
    assert [log.read_every for log in logs] == [1, 7, 7]
    assert every["epoch_loss"] == seventh["epoch_loss"]
    assert every["hr@10_category"] == seventh["hr@10_category"]
