"""Run a function on N real processes joined in a gloo process group (CPU multi-rank tests)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from genctr_rec.distributed import free_port, join_local_group


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple
) -> None:
    join_local_group(rank, world_size, port)
    try:
        result = fn(rank, world_size, *args)
        Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank; returns the per-rank results in rank order.

    ``fn`` must be importable (module level): the ranks start from a fork server.
    """
    # ranks fork from a server process that imported torchrec once, instead of each rank
    # importing it afresh (spawn): seconds of CPU a rank, many ranks a suite
    mp.set_forkserver_preload(["torchrec", "genctr_rec.distributed", "tests.distributed"])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        return [pickle.loads(Path(out_dir, f"{r}.pkl").read_bytes()) for r in range(world_size)]


def kill_a_rank_once(job, ready: Callable[[], bool], rank: int, log: Path) -> None:
    """Wait until ``ready()`` (a checkpoint is there), SIGKILL the ``rank``-th worker of the
    torchrun ``job`` (a Popen) and wait for the job to end (its restart finishes it)."""
    import os
    import signal
    import time

    import psutil

    try:
        deadline = time.time() + 300
        while not ready():
            assert time.time() < deadline and job.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        workers = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if "genctr_rec.cli" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        os.kill(workers[rank].pid, signal.SIGKILL)
        job.wait(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> str:
    """``genctr ARGS`` under torchrun with ``nproc`` ranks (one thread each); returns stdout,
    failing the test with the end of stderr when the job fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), "-m", "genctr_rec.cli", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
