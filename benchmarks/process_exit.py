"""What a ``genctr`` process spends after its work is done, by how it ends: the command as
shipped (``cli.run``: the heap frozen before the interpreter exits) against ``cli.main`` then
``sys.exit`` (the interpreter's final garbage collection walks every object torch and TorchRec
created at import), with ``os._exit`` (no interpreter shutdown at all) as the floor.

    python -m benchmarks.process_exit [--repeats 5]

The same command each time: ``genctr pretrain`` of one epoch on the simulator's toy preset, one
thread. Each repeat runs the three endings one after the other; wall and CPU (user + system,
from ``wait4``) of each process, the median over repeats, and the difference against
``main`` then ``sys.exit`` (the baseline). Torchrun ranks and every CLI process of the test
suite end the same way, so the difference is paid once per process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import run_timed, write_results
from genctr_rec.data.synth import SynthConfig, generate

ENDINGS = {
    "main, then sys.exit": "import sys; from genctr_rec.cli import main; sys.exit(main())",
    "cli.run (shipped)": "from genctr_rec.cli import run; run()",
    "main, then os._exit": (
        "import os, sys; from genctr_rec.cli import main; code = main(); "
        "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)"
    ),
}
BASELINE = "main, then sys.exit"


def run_one(code: str, args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of ``python -c CODE ARGS``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wall, cpu, exit_code = run_timed([sys.executable, "-c", code, *args], env=env)
    if exit_code != 0:
        raise RuntimeError(f"`genctr {' '.join(args)}` exited {exit_code}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "toy")
        generate(SynthConfig.preset("toy"), data)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ENDINGS}
        for repeat in range(args.repeats):
            for i, (name, code) in enumerate(ENDINGS.items()):
                out = Path(tmp, f"run-{repeat}-{i}")
                command = ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1"]
                times[name].append(run_one(code, command))
    rows = {
        name: {
            "wall_s": statistics.median(w for w, _ in runs),
            "cpu_s": statistics.median(c for _, c in runs),
            "runs": [{"wall_s": w, "cpu_s": c} for w, c in runs],
        }
        for name, runs in times.items()
    }
    base = rows[BASELINE]
    lines = [
        "| ending | wall s | CPU s | CPU s, fastest-slowest | CPU vs baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        diff = row["cpu_s"] - base["cpu_s"]
        shown = "baseline" if name == BASELINE else f"{diff:+.2f} s"
        cpu = [r["cpu_s"] for r in row["runs"]]
        spread = f"{min(cpu):.2f}-{max(cpu):.2f}"
        lines.append(f"| {name} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {spread} | {shown} |")
    lines.append(
        f"\n`genctr pretrain --epochs 1` on the toy preset, one thread, median of "
        f"{args.repeats} repeats (the three endings alternate within each). cli.run and os._exit "
        "differ by less than the repeats spread on this shared machine: read them as level."
    )
    table = "\n".join(lines)
    payload = {"command": "pretrain --epochs 1 (toy preset)", "repeats": args.repeats}
    print(write_results("process_exit", {**payload, "endings": rows}, table).read_text())


if __name__ == "__main__":
    main()
