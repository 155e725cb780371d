"""SIGTERM (a scheduler's preemption, ``torchx cancel``) mid-training: the step in flight
finishes, every rank agrees, a checkpoint is written, the command exits 143, and running it
again finishes exactly as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genctr_rec.checkpoint import CheckpointManager
from tests.test_checkpoint import ENV, _assert_same_model, _cli, _torchrun_cmd

# small batches: enough steps that the signal lands mid-training, not after it
PRETRAIN = ["--epochs", "2", "--batch-size", "8", "--checkpoint-every", "6"]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    sink = open(log, "w")  # a file, not a pipe: a full pipe would stall the job
    return subprocess.Popen(cmd, env=ENV, text=True, stdout=sink, stderr=subprocess.STDOUT)


def _sigterm_after_first_checkpoint(job: subprocess.Popen, run: Path, log: Path) -> str:
    try:
        deadline = time.time() + 300
        while not CheckpointManager(run).checkpoints():
            assert time.time() < deadline and job.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGTERM)
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    return log.read_text()


def _stopped_at(output: str) -> int:
    lines = [line for line in output.splitlines() if "stopped on SIGTERM after step" in line]
    assert lines, output[-3000:]
    return int(lines[-1].split("after step ")[1].split(",")[0])


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_finishes_identically(
    toy_synth: Path, tmp_path: Path
) -> None:
    whole, hit = tmp_path / "whole", tmp_path / "hit"
    _cli("pretrain", "--data", str(toy_synth), "--out", str(whole), *PRETRAIN)
    cmd = [sys.executable, "-m", "genctr_rec.cli", "pretrain", "--data", str(toy_synth)]
    job = _start([*cmd, "--out", str(hit), *PRETRAIN], tmp_path / "hit.log")
    output = _sigterm_after_first_checkpoint(job, hit, tmp_path / "hit.log")

    assert job.returncode == 143, output[-3000:]
    step = _stopped_at(output)
    assert CheckpointManager(hit).checkpoints()[-1].name == f"step-{step:09d}"
    assert step % 6 != 0 or step > 6  # not merely the periodic checkpoint it waited for
    assert not (hit / "metrics.json").exists()

    rerun = _cli("pretrain", "--data", str(toy_synth), "--out", str(hit), *PRETRAIN)
    assert f"step {step}" in rerun.stderr and "resumed from" in rerun.stderr
    _assert_same_model(whole, hit, tmp_path)
    mw = json.loads((whole / "metrics.json").read_text())
    mh = json.loads((hit / "metrics.json").read_text())
    for key in ("epoch_loss", "hr@10_random", "ndcg@10_category"):
        assert mw[key] == mh[key], key


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(toy_synth: Path, tmp_path: Path):
    """torchrun forwards SIGTERM to its workers; the ranks agree on the step (a rank that
    saved alone would wait forever in the checkpoint's collectives), write one checkpoint and
    exit 143; the same command resumes and finishes."""
    run = tmp_path / "run"
    args = ["finetune", "--data", str(toy_synth), "--out", str(run), "--backbone", "dnn"]
    args += ["--batch-size", "32", "--checkpoint-every", "5", "--epochs", "2"]
    job = _start(_torchrun_cmd(*args), tmp_path / "job.log")
    output = _sigterm_after_first_checkpoint(job, run, tmp_path / "job.log")

    assert job.returncode != 0, output[-3000:]  # torchrun reports the signal it received
    stops = [line.split("after step ")[1].split(",")[0] for line in output.splitlines()
             if line.startswith("genctr: stopped on SIGTERM after step")]  # fmt: skip
    assert len(stops) == 2 and len(set(stops)) == 1, output[-3000:]  # both ranks, one step
    step = int(stops[0])
    assert CheckpointManager(run).checkpoints()[-1].name == f"step-{step:09d}"

    rerun = subprocess.run(
        _torchrun_cmd(*args), env=ENV, text=True, capture_output=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and (run / "metrics.json").is_file()
