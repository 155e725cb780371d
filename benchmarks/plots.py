"""One plot per benchmark, drawn from its committed JSON (``results/<name>.json`` ->
``results/<name>.png``). Each benchmark calls :func:`plot` after writing its results;
``python -m benchmarks.plots [NAME ...]`` redraws them without re-measuring."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark's JSON, table, plot


def _reader(payload: dict, plt) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    results = payload["results"]
    keys = ["genctr_shuffled", "genctr_in_order", "hand_written_baseline", "pyarrow_decode_only"]
    x = np.arange(len(results))
    for k, key in enumerate(keys):
        ax.bar(x + 0.2 * k, [r[key] for r in results], 0.2, label=key.replace("_", " "))
    ax.set_xticks(x + 0.3, [f"history {r['history']}" for r in results])
    ax.set(yscale="log", ylabel="impressions/s (one process)")
    ax.axhline(500_000, color="k", ls="--", lw=0.8, label="target 500k")
    ax.legend(fontsize=8)
    return fig


def _lookup_layouts(payload: dict, plt) -> Any:
    results = payload["results"]
    worlds = sorted({r.get("world", 2) for r in results})
    fig, axes = plt.subplots(1, len(worlds), figsize=(7 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        mine = [r for r in results if r.get("world", 2) == world]
        layouts = list(dict.fromkeys((r["lookup"], r["dedup"]) for r in mine))
        x = np.arange(len(layouts))
        for k, kind in enumerate(("uniform", "skewed")):
            ms = [
                next(
                    r["step_ms"]
                    for r in mine
                    if (r["lookup"], r["dedup"]) == lay and r["ids"] == kind
                )
                for lay in layouts
            ]
            ax.bar(x + 0.4 * k, ms, 0.4, label=f"{kind} ids")
        ax.set_xticks(
            x + 0.2, [f"{lookup}\n{'dedup' if d else 'no dedup'}" for lookup, d in layouts]
        )
        ax.set(ylabel=f"forward+backward ms per step ({world} rank(s), row-wise)")
        ax.legend()
    return fig


def _table_scale(payload: dict, plt) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for sharding in ("row_wise", "data_parallel"):
        sel = [r for r in payload["results"] if r["sharding"] == sharding and r["status"] == "ok"]
        items = [r["items"] for r in sel]
        axes[0].plot(items, [max(r["peak_rss_gb_per_rank"]) for r in sel], "o-", label=sharding)
        axes[1].plot(items, [r["step_s"] for r in sel], "o-", label=sharding)
    axes[0].set(xscale="log", xlabel="item rows (dim 16)", ylabel="peak RSS per rank (GB)")
    axes[1].set(xscale="log", yscale="log", xlabel="item rows", ylabel="seconds per step")
    for ax in axes:
        ax.legend()
    fig.suptitle("world size 2")
    return fig


def _training_throughput(payload: dict, plt) -> Any:
    results = payload["results"]
    items = sorted({r["items"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(items), figsize=(7 * len(items), 4.5), squeeze=False)
    for ax, n in zip(axes[0], items, strict=True):
        sel = [r for r in results if r["items"] == n]
        labels = [f"{r['config']}\nw{r['world_size']}" for r in sel]
        x = np.arange(len(sel))
        ax.bar(x - 0.2, [r["torchrec_examples_per_s"] for r in sel], 0.4, label="TorchRec (ours)")
        ax.bar(x + 0.2, [r["plain_examples_per_s"] for r in sel], 0.4, label="plain PyTorch DDP")
        ax.set_xticks(x, labels, fontsize=6, rotation=60, ha="right")
        ax.set(yscale="log", ylabel="examples/s", title=f"{n:,} items")
        ax.legend()
    fig.tight_layout()
    return fig


TABLE1_NAMES = {
    1: "backbone",
    2: "+PS",
    3: "+dec",
    4: "+dec PS",
    5: "GenCTR\n(PS+MI)",
    6: "PS+MI\nCS+SD",
    7: "PS+MI\nRS+CD",
    8: "PS+MI\nRS+SD",
}


def _table1(payload: dict, plt) -> Any:
    """One panel per dataset: each configuration's test AUC (mean +- std over seeds) per
    backbone as points (no lines: the rows are configurations, not an axis), peers dashed."""
    results = payload["results"]
    datasets = list(results)
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        auc = results[dataset]["auc"]
        backbones = list(dict.fromkeys(k.split("/")[0] for k in auc))
        rows = sorted({int(k.split("/")[1]) for k in auc})
        x = np.arange(len(rows))
        for k, backbone in enumerate(backbones):
            means = [np.mean(auc[f"{backbone}/{r}"]) for r in rows]
            stds = [np.std(auc[f"{backbone}/{r}"]) for r in rows]
            ax.errorbar(x + 0.12 * (k - 1), means, yerr=stds, fmt="o", capsize=3, label=backbone)
        for peer, runs in results[dataset].get("peers", {}).items():
            level = np.mean([r["test"]["auc"] for r in runs])
            ax.axhline(level, ls="--", lw=1, color="grey")
            ax.annotate(f"DeepCTR-Torch {peer}", (-0.55, level), fontsize=8, va="bottom")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(x, [TABLE1_NAMES[r] for r in rows], fontsize=9)
        ax.set(ylabel="test AUC")
        ax.set_title(f"{dataset}: Table 1 rows, mean ± std over seeds", fontsize=11)
        ax.legend(fontsize=9)
    fig.suptitle(_machine_title(payload), fontsize=9)
    fig.tight_layout()
    return fig


def _transfer_levers(payload: dict, plt) -> Any:
    """Per dataset: test AUC minus the backbone alone's, per seed, for each fine-tuning lever."""
    results = payload["results"]
    datasets = list(results)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        auc = results[dataset]["auc"]
        base = np.array(auc["none"])
        order = ["before", "ps", "mi_concat", "mi_residual", "mi_product"]
        names = [v for v in order if v in auc] + sorted(v for v in auc if v not in order + ["none"])
        deltas = [np.array(auc[v]) - base for v in names]
        ax.bar(
            range(len(names)),
            [d.mean() for d in deltas],
            yerr=[d.std() for d in deltas],
            capsize=3,
            color=["#bbb" if v == "before" else "#4a7" for v in names],
        )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=9)
        ax.set(ylabel="test AUC − backbone alone")
        ax.set_title(f"{dataset}: what each lever adds (mean ± std over seeds)", fontsize=11)
    fig.suptitle(_machine_title(payload), fontsize=9)
    fig.tight_layout()
    return fig


def _machine_title(payload: dict) -> str:
    m = payload.get("machine", {})
    device = payload.get("device", "CPU")
    accelerator = "CPU only" if device == "CPU" else device
    where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {accelerator}"
    return f"measured on {where}, {m.get('date', '')}"


def _serving_latency(payload: dict, plt) -> Any:
    """In process: p50 bars with p99 whiskers per mode and candidates, one bar per (format,
    tables); over HTTP: requests/s per (format, tables) at each client count."""
    rows = payload["in_process"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.5, 1]})
    ax = axes[0]
    cells = list(dict.fromkeys((r["mode"], r["candidates"]) for r in rows))
    series = list(dict.fromkeys((r["format"], r["tables"]) for r in rows))
    width = 0.8 / len(series)
    x = np.arange(len(cells))
    for k, (fmt, tables) in enumerate(series):
        found = [
            next((r for r in rows if (r["mode"], r["candidates"]) == c
                  and (r["format"], r["tables"]) == (fmt, tables)), None)
            for c in cells
        ]  # fmt: skip
        p50 = np.array([r["p50_ms"] if r else np.nan for r in found])
        p99 = np.array([r["p99_ms"] if r else np.nan for r in found])
        ax.bar(x + width * k, p50, width, label=f"{fmt} {tables}")
        ax.errorbar(
            x + width * k, p50, yerr=[np.zeros_like(p50), p99 - p50], fmt="none",
            ecolor="black", capsize=2,
        )  # fmt: skip
    ax.set_xticks(x + 0.4 - width / 2, [f"{m}\n{c} cand." for m, c in cells], fontsize=8)
    ax.set_ylabel("latency per request (ms): p50, whisker p99")
    ax.set_title("in process, history 200", fontsize=10)
    ax.legend(fontsize=8)
    http = payload.get("http", [])
    ax = axes[1]
    labels = [
        f"{r['format']} {r['tables']}, {r['clients']} cl"
        + (f", {r['workers']} wk" if r["workers"] > 1 else "")
        for r in http
    ]
    ax.bar(np.arange(len(http)), [r["requests_per_s"] for r in http], color="tab:green")
    ax.set_xticks(np.arange(len(http)), labels, fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("requests/s (median of 3)")
    ax.set_title("over HTTP, 100 candidates", fontsize=10)
    fig.suptitle(_machine_title(payload), fontsize=9)
    fig.tight_layout()
    return fig
def _decoder_cost(payload: dict, plt) -> Any:
    rows = payload["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, stage in zip(axes, ("pretrain", "finetune"), strict=True):
        stage_rows = [r for r in rows if r["stage"] == stage]
        for variant in dict.fromkeys(r["variant"] for r in stage_rows):
            sel = [r for r in stage_rows if r["variant"] == variant]
            ax.plot(
                [r["history"] for r in sel], [r["throughput"] for r in sel], "o-", label=variant
            )
        ax.set(xscale="log", yscale="log", xlabel="history length cap H")
        ax.set(ylabel=stage_rows[0]["unit"], title=stage)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _decoder_cost_cuda(payload: dict, plt) -> Any:
    """Throughput per case, one bar per layout x precision, relative to padded fp32."""
    rows = [r for r in payload["rows"] if "error" not in r]
    cases = list(dict.fromkeys((r["stage"], r["dim"], r["cap"], r["rows"]) for r in rows))
    variants = list(dict.fromkeys((r["layout"], r["precision"]) for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        gains = []
        for case in cases:
            sel = {
                (r["layout"], r["precision"]): r
                for r in rows
                if case == (r["stage"], r["dim"], r["cap"], r["rows"])
            }
            base = sel.get(("padded", "fp32"))
            have = sel.get(variant)
            gains.append(have["throughput"] / base["throughput"] if have and base else 0)
        ax.bar([c + i * width for c in range(len(cases))], gains, width, label=" ".join(variant))
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{s}\ndim {d}, cap {c}" for s, d, c, _ in cases], fontsize=7)
    ax.axhline(1, color="grey", lw=0.5)
    ax.set(ylabel="throughput / padded fp32", title=f"decoder alone on {payload['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _sharding_matrix(payload: dict, plt) -> Any:
    rows, base = payload["configurations"], payload["baselines"]
    dims = sorted({b["dim"] for b in base})
    worlds = sorted({r["world"] for r in rows})
    speed_worlds = [w for w in (1, 2) if w in worlds] or worlds[:1]
    shardings = list(dict.fromkeys(r["sharding"] for r in rows))
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(shardings)}
    nrows = len(speed_worlds) + 1
    fig, axes = plt.subplots(nrows, len(dims), figsize=(7 * len(dims), 4 * nrows), squeeze=False)

    def ok(world: int, module: str, sharding: str, dim: int) -> list[dict]:
        key = (world, module, sharding, dim)
        return [
            r
            for r in rows
            if (r["world"], r["module"], r["sharding"], r["dim"]) == key and r["status"] == "ok"
        ]

    for col, dim in enumerate(dims):
        b = [x for x in base if x["dim"] == dim]
        sizes = [x["rows"] for x in b]
        for line, world in enumerate(speed_worlds):
            ax = axes[line][col]
            ax.plot(sizes, [x["gather_rows_per_s"] for x in b], "k--", label="gather ceiling")
            ax.plot(
                sizes, [x["fbgemm_pooled_lookups_per_s"] for x in b], "k-.", label="fbgemm kernel"
            )
            ax.plot(
                sizes, [x["embedding_lookups_per_s"] for x in b], "k:", label="nn.Embedding sparse"
            )
            for module, style, marker in (("pooled", "-", "o"), ("sequence", "--", "s")):
                for sharding in shardings:
                    sel = ok(world, module, sharding, dim)
                    if sel:
                        ax.plot(
                            [r["rows"] for r in sel],
                            [r["lookups_per_s"] for r in sel],
                            style,
                            color=colour[sharding],
                            marker=marker,
                            label=f"{module} {sharding}",
                        )
            ax.set(xscale="log", yscale="log", xlabel="item rows", ylabel="lookups/s per rank")
            ax.set_title(f"forward+backward, world size {world}, dim {dim}", fontsize=10)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax = axes[-1][col]
        for sharding in shardings:
            for w in worlds:
                sel = ok(w, "pooled", sharding, dim)
                if sel:
                    ax.plot(
                        [r["rows"] for r in sel],
                        [r["peak_rss_bytes"] / 2**30 for r in sel],
                        ("-", "--", ":", "-.")[worlds.index(w) % 4],
                        color=colour[sharding],
                        marker="o",
                        label=f"{sharding}, {w} rank{'s' if w > 1 else ''}",
                    )
        ax.set(xscale="log", yscale="log", xlabel="item rows", ylabel="peak RSS per rank (GiB)")
        ax.set_title(f"pooled tables, dim {dim}: memory per rank", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def _finetune_speed(payload: dict, plt) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in payload["rows"]:
        speed = row["examples_per_s"]
        style = "--" if "baseline" in row["name"] else "-"
        ax.plot(range(1, len(speed) + 1), speed, style, marker="o", label=row["name"])
    din = payload.get("din")
    if din:  # one run (0.8 and before) or one per round
        din_speed = (
            np.median([d["examples_per_s"] for d in din])
            if isinstance(din, list)
            else (din["examples_per_s"])
        )
        ax.axhline(din_speed, color="black", ls=":", label="DeepCTR DIN")
    ax.set(xlabel="epoch", ylabel="training examples/s (one process, median of rounds)",
           yscale="log")  # fmt: skip
    ax.set_xticks(range(1, payload["epochs"] + 1))
    ax.set_title("fine-tuning speed per epoch", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


PLOTTERS: dict[str, Callable] = {
    "reader_throughput": _reader,
    "lookup_layouts": _lookup_layouts,
    "table_scale": _table_scale,
    "training_throughput": _training_throughput,
    "table1": _table1,
    "transfer_levers": _transfer_levers,
    "serving_latency": _serving_latency,
    "decoder_cost": _decoder_cost,
    "decoder_cost_cuda": _decoder_cost_cuda,
    "sharding_matrix": _sharding_matrix,
    "finetune_speed": _finetune_speed,
}


def plot(name: str) -> None:
    """Draw ``results/<name>.png`` from ``results/<name>.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads((RESULTS / f"{name}.json").read_text())
    fig = PLOTTERS[name](payload, plt)
    if not fig._suptitle:  # every figure says where it was measured
        fig.text(0.995, 0.005, _machine_title(payload), ha="right", va="bottom", fontsize=8)
    fig.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"default: every one of {sorted(PLOTTERS)}")
    for name in parser.parse_args().names or PLOTTERS:
        if (RESULTS / f"{name}.json").is_file():
            plot(name)
            print(RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
