"""How long the README's test command takes on a fresh clone, this revision against an
earlier one, on the same machine in the same run: what CI runs (``.ci/run`` is ``make test``),
so "the suite is no slower" is a measurement and not two numbers from different days.

    python -m benchmarks.suite_time [--baseline 7519fde] [--revision HEAD] [--repeats 2]

Each revision is cloned from this repository (committed state only) into a temporary folder and
installs its own environment once (``make install-dev``, timed apart); then ``make test`` runs
``--repeats`` times per revision, alternating baseline and revision, each with a fresh
Inductor cache as CI's clean machine has. Per run: wall seconds of ``make test``, pytest's own
seconds and test counts (its summary line), and the CPU seconds (user + system) of the command
and every process it reaped. The default baseline is 0.10.0 (7519fde), the revision issue 27
asked not to be slower than; its suite ran serially, the later ones on two xdist workers.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import run_timed, write_results

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+.*?) in (?P<seconds>[\d.]+)s\b")


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``command`` to its end, its output kept in ``log``: wall and CPU seconds (the
    command and the processes it reaped) and exit code."""
    with log.open("wb") as out:
        wall, cpu, exit_code = run_timed(command, cwd, env, out)
    return {"wall_s": wall, "cpu_s": cpu, "exit_code": exit_code}


def pytest_summary(log: Path) -> dict[str, Any]:
    """pytest's last summary line: its seconds and counts (``{"passed": 358, ...}``)."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        match = SUMMARY.search(line)
        if match:
            found = match
    if found is None:
        return {"pytest_s": None, "counts": {}}
    counts = {}
    for part in found["counts"].split(","):
        number, _, kind = part.strip().partition(" ")
        if number.isdigit():
            counts[kind] = int(number)
    return {"pytest_s": float(found["seconds"]), "counts": counts}


def clone(revision: str, folder: Path) -> str:
    """A fresh clone of ``revision`` in ``folder``; its full commit id."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "-C", str(folder), "checkout", "-q", revision], check=True)
    return subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="7519fde", help="default: 0.10.0's last commit")
    parser.add_argument("--revision", default="HEAD")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    names = {"baseline": args.baseline, "revision": args.revision}
    with tempfile.TemporaryDirectory(prefix="suite-time-") as tmp:
        root = Path(tmp)
        base_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))
        }
        commits, installs = {}, {}
        for role, revision in names.items():
            commits[role] = clone(revision, root / role)
            installs[role] = timed(
                ["make", "install-dev"], root / role, base_env, root / f"{role}-install.log"
            )
            if installs[role]["exit_code"] != 0:
                raise SystemExit(
                    f"{role} ({revision}) failed to install: {root / role}-install.log"
                )
        runs: dict[str, list[dict[str, Any]]] = {role: [] for role in names}
        for repeat in range(args.repeats):
            for role in names:
                env = {
                    **base_env,
                    "TORCHINDUCTOR_CACHE_DIR": str(root / f"inductor-{role}-{repeat}"),
                }
                log = root / f"{role}-test-{repeat}.log"
                run = timed(["make", "test"], root / role, env, log)
                run.update(pytest_summary(log))
                runs[role].append(run)
                print(f"{role} repeat {repeat}: {run}", flush=True)
    rows = {}
    for role, results in runs.items():
        rows[role] = {
            "revision": names[role],
            "commit": commits[role],
            "install_s": installs[role]["wall_s"],
            "wall_s": statistics.median(r["wall_s"] for r in results),
            "pytest_s": statistics.median(r["pytest_s"] or float("nan") for r in results),
            "cpu_s": statistics.median(r["cpu_s"] for r in results),
            "counts": results[-1]["counts"],
            "all_passed": all(r["exit_code"] == 0 for r in results),
            "runs": results,
        }
    base = rows["baseline"]
    lines = [
        "| revision | tests passed | make test wall s (each run) | pytest s (median) | "
        "CPU s (median) | pytest s vs baseline | install s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for role, row in rows.items():
        each = ", ".join(f"{r['wall_s']:.0f}" for r in row["runs"])
        change = (
            "baseline"
            if role == "baseline"
            else f"{100 * (row['pytest_s'] / base['pytest_s'] - 1):+.1f} %"
        )
        passed = row["counts"].get("passed", 0)
        status = "" if row["all_passed"] else " (FAILED)"
        lines.append(
            f"| {row['revision']} ({row['commit'][:7]}){status} | {passed} | {each} | "
            f"{row['pytest_s']:.0f} | {row['cpu_s']:.0f} | {change} | {row['install_s']:.0f} |"
        )
    lines.append(
        f"\n`make test` (the README's test command, what CI runs) on fresh clones, {args.repeats} "
        "runs each, baseline and revision alternating, a fresh Inductor cache each run. Read a "
        "difference smaller than the spread of one revision's own runs as level."
    )
    payload = {"baseline": args.baseline, "revision": args.revision, "repeats": args.repeats}
    print(write_results("suite_time", {**payload, "revisions": rows}, "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()
