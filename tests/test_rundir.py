"""Run directories: foreign and unwritable ``--out`` refused, a lock against two jobs in one
directory (stale and restarted-job locks taken over), ``--data`` compared as a directory, and a
run that never saved a checkpoint re-configurable after a data error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genctr_rec.cli import main
from genctr_rec.training.rundir import LOCK_FILE, LockOwner, RunDirError, RunLock

FINETUNE = ["--backbone", "dnn", "--batch-size", "256", "--steps", "2", "--no-side-features"]


def _finetune(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--data", str(data), "--out", str(out), *FINETUNE, *extra]


def _last_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return lines[-1]


def test_a_directory_of_other_files_is_refused_and_left_alone(
    small_dataset: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("x")
    assert main(_finetune(small_dataset, out)) == 2
    error = _last_error(capsys)
    assert "holds files that are not a genctr run (notes.txt, sub" in error
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


def test_an_unwritable_out_is_one_clear_line(small_dataset: Path, tmp_path: Path) -> None:
    """Under torchrun too: every rank fails with the same line, no traceback of ours (torchrun
    reports its failed children with its own)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "run"
    for command in (
        [sys.executable, "-m", "genctr_rec.cli", *_finetune(small_dataset, out)],
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "genctr_rec.cli",
            *_finetune(small_dataset, out),
        ],
    ):
        proc = subprocess.run(command, text=True, capture_output=True, timeout=300)
        assert proc.returncode != 0
        assert f"genctr: error: cannot write to --out {out}: Not a directory" in proc.stderr
        assert "NotADirectoryError" not in proc.stderr, proc.stderr[-2000:]
        assert "genctr_rec/" not in proc.stderr, "no frame of ours"


def _owner(**changes) -> dict:
    me = LockOwner.me()
    return {**me.__dict__, **changes}


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from genctr_rec.training.rundir import _process_start

        lock = tmp_path / LOCK_FILE
        holder = _owner(pid=sleeper.pid, process_start=_process_start(sleeper.pid), job=None)
        lock.write_text(json.dumps(holder))
        with pytest.raises(RunDirError, match=f"in use by pid {sleeper.pid} on "):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunDirError, match=f"delete {lock}"):
            RunLock(tmp_path).acquire()
        # a restart of the same torchrun / torchx job takes its own lock over, on any host
        lock.write_text(json.dumps({**holder, "host": "elsewhere", "job": "job-7"}))
        os.environ["TORCHELASTIC_RUN_ID"] = "job-7"
        try:
            restarted = RunLock(tmp_path)
            restarted.acquire()
        finally:
            del os.environ["TORCHELASTIC_RUN_ID"]
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        restarted.release()
        assert not lock.exists()
        # held on another host by another job: cannot be checked, so refused
        lock.write_text(json.dumps({**holder, "host": "elsewhere", "job": "job-8"}))
        with pytest.raises(RunDirError, match="If nothing on elsewhere uses it any more"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale on this host and taken over
    lock.write_text(json.dumps({**holder, "host": socket.gethostname()}))
    RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a pid reused by another process (another start time) is not the holder either
    lock.write_text(json.dumps(_owner(pid=os.getppid(), process_start="1")))
    RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_run_directory_is_locked_while_training_and_released_after(
    small_dataset: Path, tmp_path: Path, capsys, caplog
) -> None:
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps(_owner(pid=sleeper.pid, process_start=None)))
        assert main(_finetune(small_dataset, out)) == 2
        assert f"is in use by pid {sleeper.pid}" in _last_error(capsys)
        assert not (out / "config.json").exists(), "nothing written while locked out"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(_finetune(small_dataset, out)) == 0
    assert "taking over the lock (stale lock" in caplog.text
    assert (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()


def test_data_is_compared_as_a_directory_not_as_text(
    small_dataset: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """Stopped, then resumed with the same dataset spelt another way (relative vs absolute);
    config.json holds the absolute path, so the run is read from any directory."""
    out = tmp_path / "run"
    monkeypatch.chdir(small_dataset.parent)
    every = ["--checkpoint-every", "1"]
    assert main(_finetune(Path(small_dataset.name), out, *every, "--stop-after-steps", "1")) == 0
    assert json.loads((out / "config.json").read_text())["data"] == str(small_dataset)
    monkeypatch.chdir(tmp_path.parent)
    assert main(_finetune(small_dataset, out, *every)) == 0
    assert "resumed from" in caplog.text
    assert main(["evaluate", "--run", str(out)]) == 0


def test_a_run_stopped_by_bad_data_restarts_with_corrected_data_at_another_path(
    small_dataset: Path, tmp_path: Path, capsys, caplog
) -> None:
    from tests.helpers import write_dataset

    out = tmp_path / "run"
    train = small_dataset / "train" / "part-00000.parquet"
    table = pq.read_table(train)
    labels = table["label"].to_numpy().astype("float64")
    labels[3] = 7.0
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    pq.write_table(table, train)
    assert main(_finetune(small_dataset, out)) == 2
    assert "genctr: error:" in capsys.readouterr().err  # the reader's, naming the label row
    assert (out / "config.json").is_file()

    fixed = write_dataset(tmp_path / "fixed")
    assert main(_finetune(fixed, out)) == 0
    assert "replacing the configuration of a run that never saved" in caplog.text
    assert json.loads((out / "config.json").read_text())["data"] == str(fixed)
    # once a run has saved state, another configuration is refused
    assert main(_finetune(small_dataset, out)) == 2
    assert "holds a run with a different configuration (differs in ['data'])" in _last_error(capsys)
