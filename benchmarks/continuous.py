"""Continuous life, day by day: warm start vs retraining on a sliding window vs yesterday's
model unchanged, and the service's latency while it swaps models.

One world (``genctr data synth --days``: items and users born and retired, interests
drifting) is replayed day by day. For each day k >= 1 and each seed:

Each day's model is trained the same way for every strategy, under two protocols run side by
side: ``selected`` (the project's validation-based selection within 2 epochs) and ``one-pass``
(the paper's fine-tuning: one epoch over every row, no held-out slice, no selection).

* (a) ``warm``: ``genctr finetune --warm-start`` yesterday's warm run, on day k alone;
* (b) ``window``: ``genctr finetune`` from scratch on the last ``--window`` days (3);
* (c) ``frozen``: the day-0 model, exported, never updated, scoring day k + 1 through the
  serving path (new items and users read the default rows, as they would in production).

Every strategy is scored on day k + 1 (each day's ``test/``): AUC, LogLoss, calibration, and
the training time (the training loop's own, ``metrics.json``'s ``train_seconds``, beside the
command's wall time, which adds start-up, data checks and the test evaluation). Each claim is
paired per (day, seed): warm - window and warm - frozen AUC, with the range over seeds.
Decided before the run: the target holds where warm's AUC is no further below window's than
the seeds' spread of window's AUC that day, at a third of window's training time or less, and
both beat frozen from the second compared day on. Then the last two warm models are exported into a
directory of versions and served (``genctr serve --artifact MODELS --poll-s 0.2``): 4 clients
score for a steady period, the newer version is published, and the latencies of the requests
around the swap are reported beside the steady ones.

    python -m benchmarks.continuous                      # ~15 min on 2 cores (both protocols)
    python -m benchmarks.continuous --days 3 --seeds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import write_results
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.metrics import ctr_metrics
from genctr_rec.serving.export import export_run
from genctr_rec.serving.predictor import Predictor, Request

TRAIN = ["--backbone", "dnn", "--batch-size", "256"]
# how each day's model is trained, the same for every strategy: "selected" is the project's
# validation-based selection (the newest 10 % of the day's train/ held out, patience) within 2
# epochs; "one-pass" is the paper's fine-tuning (one epoch, every row trained on, no selection)
PROTOCOLS = {
    "selected": ["--epochs", "2"],
    "one-pass": ["--epochs", "1", "--valid-fraction", "0"],
}


def genctr(*args: str) -> float:
    """Run a genctr command; returns its wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "genctr_rec.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"genctr {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def test_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]


def train_seconds(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["train_seconds"]


def requests_of(data: Path) -> tuple[list[Request], np.ndarray, np.ndarray]:
    """Each test impression as a one-candidate serving request (with its side features)."""
    meta = DatasetMeta.read(data)
    table = pq.read_table(data / "test").to_pydict()
    names = [f.name for f in meta.features if f.where == "impression"]
    requests = [
        Request(
            table["hist_item_ids"][i],
            table["hist_category_ids"][i],
            table["query_category_id"][i],
            [table["item_id"][i]],
            [table["category_id"][i]],
            user_id=table["user_id"][i],
            features={name: table[name][i] for name in names},
        )
        for i in range(len(table["label"]))
    ]
    return requests, np.asarray(table["label"]), np.asarray(table["user_id"])


def served_metrics(predictor: Predictor, data: Path) -> dict:
    requests, labels, users = requests_of(data)
    scores = []
    for start in range(0, len(requests), 512):
        prepared = [predictor.prepare(r) for r in requests[start : start + 512]]
        scores += [s[0] for s in predictor.score_prepared(prepared)]
    return ctr_metrics(np.asarray(scores, dtype=np.float64), labels, users)


def make_worlds(root: Path, days: int, window: int, users: int) -> tuple[Path, Path]:
    """The day-by-day world, and the same world with each day trained on ``window`` days."""
    world = root / "world"
    windowed = root / f"world-window{window}"
    common = ["--preset", "toy", "--num-users", str(users), "--days", str(days)]
    genctr("data", "synth", *common, "--out", str(world))
    genctr("data", "synth", *common, "--window", str(window), "--out", str(windowed))
    return world, windowed


def replay(
    root: Path, world: Path, windowed: Path, days: int, seeds: list[int], protocol: str
) -> list[dict]:
    rows = []
    for seed in seeds:
        flags = [*TRAIN, *PROTOCOLS[protocol], "--seed", str(seed)]
        first = root / f"{protocol}-warm-s{seed}-d00"
        seconds = genctr("finetune", "--data", str(world / "day-00"), "--out", str(first), *flags)
        export_run(first, root / f"{protocol}-frozen-s{seed}", compile_aoti="none")
        frozen = Predictor(root / f"{protocol}-frozen-s{seed}")
        previous = first
        for k in range(1, days):
            day = f"day-{k:02d}"
            warm = root / f"{protocol}-warm-s{seed}-d{k:02d}"
            scratch = root / f"{protocol}-window-s{seed}-d{k:02d}"
            # a warm start inherits the model settings (the same flags do not contradict them)
            warm_s = genctr(
                "finetune", "--data", str(world / day), "--out", str(warm),
                "--warm-start", str(previous), *flags,
            )  # fmt: skip
            window_s = genctr(
                "finetune", "--data", str(windowed / day), "--out", str(scratch), *flags
            )
            for strategy, metrics, loop_s, wall_s in (
                ("warm", test_metrics(warm), train_seconds(warm), warm_s),
                ("window", test_metrics(scratch), train_seconds(scratch), window_s),
                ("frozen", served_metrics(frozen, world / day), 0.0, 0.0),
            ):
                rows.append(
                    {
                        "protocol": protocol,
                        "seed": seed,
                        "day": k,
                        "strategy": strategy,
                        "auc": metrics["auc"],
                        "logloss": metrics["logloss"],
                        "calibration": metrics["calibration"],
                        "train_s": round(loop_s, 2),
                        "command_s": round(wall_s, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            previous = warm
        rows.append(
            {
                "protocol": protocol,
                "seed": seed,
                "day": 0,
                "strategy": "warm",
                "train_s": train_seconds(first),
                "command_s": round(seconds, 1),
                **{k: test_metrics(first)[k] for k in ("auc", "logloss", "calibration")},
            }
        )
    return rows


def swap_latency(root: Path, protocol: str, seed: int, days: int, clients: int = 4) -> dict:
    """p50/p99 of /score in a steady period and in the 3 s around a swap."""
    models = root / "models"
    models.mkdir()
    old, new = days - 2, days - 1
    for k in (old, new):
        export_run(root / f"{protocol}-warm-s{seed}-d{k:02d}", root / f"export-d{k:02d}")
    shutil.copytree(root / f"export-d{old:02d}", models / f"d{old:02d}")
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen(
        [sys.executable, "-m", "genctr_rec.cli", "serve", "--artifact", str(models),
         "--port", str(port), "--poll-s", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        requests, _, _ = requests_of(root / "world" / f"day-{new:02d}")
        bodies = [
            {
                "history": {"item_ids": list(r.history_items),
                            "category_ids": list(r.history_categories)},
                "query_category_id": r.query_category,
                "user_id": r.user_id,
                "features": r.features,
                "candidates": [{"item_id": i} for i in r.candidate_items] * 20,
            }
            for r in requests[:200]
        ]  # fmt: skip
        samples: list[tuple[float, float, int, str]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client(seed_: int) -> None:
            rng = np.random.default_rng(seed_)
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    started = time.perf_counter()
                    reply = http.post("/score", json=bodies[int(rng.integers(0, len(bodies)))])
                    took = time.perf_counter() - started
                    with lock:
                        samples.append(
                            (
                                started,
                                took,
                                reply.status_code,
                                reply.headers.get("x-genctr-model-version", ""),
                            )
                        )

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(4.0)
        published = time.perf_counter()
        staging = models / ".incoming"
        shutil.copytree(root / f"export-d{new:02d}", staging)
        os.replace(staging, models / f"d{new:02d}")
        while httpx.get(f"{url}/metadata").json()["version"] != f"d{new:02d}":
            time.sleep(0.05)
        swapped = time.perf_counter()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def summary(chosen: list) -> dict:
        ms = np.asarray([s[1] for s in chosen]) * 1000
        return {"requests": len(chosen), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2)}  # fmt: skip

    steady = [s for s in samples if published - 3.0 <= s[0] < published]
    during = [s for s in samples if published <= s[0] < swapped + 1.0]
    return {
        "clients": clients,
        "candidates": 20,
        "steady": summary(steady),
        "during_swap": summary(during),
        "swap_s": round(swapped - published, 2),
        "failed": sum(1 for s in samples if s[2] != 200),
        "versions_seen": sorted({s[3] for s in samples}),
    }


def verdict(rows: list[dict], days: int) -> list[dict]:
    """Per compared day: warm - window and warm - frozen AUC paired by seed (mean and range),
    window's seed spread, warm's share of window's training time, and whether the cut points
    fixed in the module docstring hold."""
    out = []
    for k in range(1, days):
        by = {
            s: {r["seed"]: r for r in rows if r["day"] == k and r["strategy"] == s}
            for s in ("warm", "window", "frozen")
        }
        seeds = sorted(by["warm"])
        vs_window = [by["warm"][i]["auc"] - by["window"][i]["auc"] for i in seeds]
        vs_frozen = [by["warm"][i]["auc"] - by["frozen"][i]["auc"] for i in seeds]
        window_over_frozen = [by["window"][i]["auc"] - by["frozen"][i]["auc"] for i in seeds]
        window_aucs = [by["window"][i]["auc"] for i in seeds]
        spread = max(window_aucs) - min(window_aucs)
        share = np.mean([by["warm"][i]["train_s"] for i in seeds]) / np.mean(
            [by["window"][i]["train_s"] for i in seeds]
        )
        out.append(
            {
                "day": k,
                "warm_minus_window": [round(float(np.mean(vs_window)), 4),
                                      round(min(vs_window), 4), round(max(vs_window), 4)],
                "window_seed_spread": round(spread, 4),
                "warm_minus_frozen": [round(float(np.mean(vs_frozen)), 4),
                                      round(min(vs_frozen), 4), round(max(vs_frozen), 4)],
                "window_minus_frozen_mean": round(float(np.mean(window_over_frozen)), 4),
                "warm_time_share": round(float(share), 3),
                "warm_matches_window": bool(np.mean(vs_window) >= -max(spread, 1e-4)),
                "warm_third_of_time": bool(share <= 1 / 3),
                "both_beat_frozen": bool(min(vs_frozen) > 0 and min(window_over_frozen) > 0),
            }
        )  # fmt: skip
    return out


def table(rows: list[dict], days: int, swap: dict, verdicts: dict[str, list[dict]]) -> str:
    lines = []
    for protocol, flags in PROTOCOLS.items():
        lines += [f"### protocol {protocol} (`{' '.join(TRAIN + flags)}`)", ""]
        chosen = [r for r in rows if r["protocol"] == protocol]
        lines += protocol_table(chosen, days, verdicts[protocol]) + [""]
    lines += [
        f"Serving during a swap ({swap['clients']} clients, {swap['candidates']} candidates, "
        f"swap took {swap['swap_s']} s from publish to serving, {swap['failed']} failed "
        f"requests, versions seen {swap['versions_seen']}):",
        "",
        "| period | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| steady (3 s before) | {swap['steady']['requests']} | {swap['steady']['p50_ms']} | "
        f"{swap['steady']['p99_ms']} |",
        f"| publish to swap + 1 s | {swap['during_swap']['requests']} | "
        f"{swap['during_swap']['p50_ms']} | {swap['during_swap']['p99_ms']} |",
    ]
    return "\n".join(lines)


def protocol_table(rows: list[dict], days: int, verdicts: list[dict]) -> list[str]:
    lines = [
        "| day | strategy | AUC (mean [seed range]) | LogLoss | calibration | training s "
        "(loop) | command s |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in range(1, days):
        for strategy in ("warm", "window", "frozen"):
            got = [r for r in rows if r["day"] == k and r["strategy"] == strategy]
            auc = [r["auc"] for r in got]
            lines.append(
                f"| {k} | {strategy} | {np.mean(auc):.4f} [{min(auc):.4f}, {max(auc):.4f}] | "
                f"{np.mean([r['logloss'] for r in got]):.4f} | "
                f"{np.mean([r['calibration'] for r in got]):.3f} | "
                f"{np.mean([r['train_s'] for r in got]):.1f} | "
                f"{np.mean([r['command_s'] for r in got]):.1f} |"
            )
    lines += [
        "",
        "Paired by seed (mean [min, max] over seeds); the cut points are the module docstring's:",
        "",
        "| day | warm - window AUC | window's seed spread | warm - frozen AUC | "
        "warm's share of window's training time | warm matches window | <= 1/3 time | "
        "both beat frozen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        d, f = v["warm_minus_window"], v["warm_minus_frozen"]
        lines.append(
            f"| {v['day']} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] | "
            f"{v['window_seed_spread']:.4f} | {f[0]:+.4f} [{f[1]:+.4f}, {f[2]:+.4f}] | "
            f"{v['warm_time_share']:.2f} | "
            f"{'yes' if v['warm_matches_window'] else 'no'} | "
            f"{'yes' if v['warm_third_of_time'] else 'no'} | "
            f"{'yes' if v['both_beat_frozen'] else 'no'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--users", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="genctr-continuous-") as tmp:
        root = Path(tmp)
        world, windowed = make_worlds(root, args.days, args.window, args.users)
        rows = []
        for protocol in PROTOCOLS:
            seeds = list(range(args.seeds))
            rows += replay(root, world, windowed, args.days, seeds, protocol)
        swap = swap_latency(root, "one-pass", 0, args.days)
    verdicts = {
        p: verdict([r for r in rows if r["protocol"] == p], args.days) for p in PROTOCOLS
    }
    payload = {"days": args.days, "window": args.window, "users": args.users,
               "train_flags": TRAIN, "protocols": PROTOCOLS, "rows": rows,
               "verdicts": verdicts, "swap": swap}  # fmt: skip
    print(write_results("continuous", payload, table(rows, args.days, swap, verdicts)))


if __name__ == "__main__":
    main()
