"""Shared by the benchmarks: machine description and result writing (JSON + markdown)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from benchmarks.plots import PLOTTERS, RESULTS, plot
from genctr_rec.storage import write_bytes, write_json


def reset_peak_rss() -> None:
    """Restart this process's RSS high-water mark (VmHWM). ``ru_maxrss`` cannot be used: Linux
    carries it across exec, so a spawned rank would report its parent's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark since start or the last :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_timed(
    command: list[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    output: IO[bytes] | int = subprocess.DEVNULL,
) -> tuple[float, float, int]:
    """Run ``command`` to its end with stdout and stderr to ``output``: its wall seconds, CPU
    seconds (user + system, from ``wait4``: the process and every descendant it reaped, never
    this process's own children) and exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, with the child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, proc.returncode


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec", "pyarrow", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(["python -m", f"benchmarks.{Path(sys.argv[0]).stem}"] + sys.argv[1:]),
    }


def write_results(name: str, payload: dict[str, Any], table_md: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically, and the plot."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    write_json(RESULTS / f"{name}.json", {"machine": info, **payload})
    header = (
        f"# {name}\n\n- command: `{info['command']}`\n- machine: {info['cpu']}, "
        f"{info['cores']} cores\n- versions: {info['versions']}\n- date: {info['date']}\n\n"
    )
    write_bytes(RESULTS / f"{name}.md", (header + table_md + "\n").encode())
    if name in PLOTTERS:
        plot(name)  # results/<name>.png
    return RESULTS / f"{name}.md"
