"""The decoder alone in each layout, fp32 and bf16 (pure PyTorch: no TorchRec, so it runs on a
GPU machine that has only torch).

    python -m benchmarks.decoder_layouts --device cuda   # results/decoder_cost_cuda

Pre-training: forward + backward + Adam step of a 2-layer ``GenerativeDecoder`` (issue 13's
setting) over a jagged batch of item and category embeddings (leaf tensors, so their gradients
are computed as the tables' would be), loss the mean squared distance of g to a random target.
Fine-tuning: the same for g(s, c) of a 1-layer decoder, one query a row, 1024 rows. Row lengths
``1 + Exponential(cap / 3)`` capped; four batches drawn per case and used in turn, so the
timed steps meet different total lengths (the packed path's shapes change as in training).

Layouts: ``padded`` (whole batch padded to the history cap on CUDA, to its longest row on
CPU; SDPA), ``padded, longest row`` (CUDA: padded to the batch's longest row, which reads it
from the device every batch: the padded layout before), ``packed`` (one document-causal
sequence: FlexAttention, compiled, on CUDA), ``groups`` (rows grouped by length: CPU only,
the CPU default). Precision: ``fp32`` or ``bf16`` (``torch.autocast``; weights, Adam state and
the loss in fp32). Before timing, on CUDA: the packed path's outputs and gradients against the
padded path's (relative error), and one packed step under ``torch.cuda.set_sync_debug_mode
("error")`` (an error if anything in the step reads the device from the host).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_results
from benchmarks.decoder_cost import row_lengths  # the same long-tailed row lengths
from genctr_rec.models.decoder import GenerativeDecoder

# (stage, dim, history cap, rows a batch)
CASES = (
    ("pretrain", 16, 50, 1024),
    ("pretrain", 16, 200, 512),
    ("pretrain", 16, 500, 384),
    ("pretrain", 16, 1000, 256),
    ("pretrain", 16, 4000, 64),
    ("pretrain", 64, 1000, 256),
    ("pretrain", 64, 4000, 64),
    ("target", 16, 50, 1024),
    ("target", 16, 200, 1024),
    ("target", 16, 1000, 1024),
)
BATCHES = 4
# the padded layout padding to the batch's longest row (read from the device every batch)
# instead of the history cap, CUDA's default
LONGEST_ROW = "padded, longest row"


def _batches(stage: str, dim: int, cap: int, rows: int, device: torch.device, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BATCHES):
        lengths = row_lengths(rng, rows, cap)
        if stage == "target":
            lengths = lengths - 1  # fine-tuning histories may be empty
        n = int(lengths.sum())
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        items, cats = (
            torch.randn(n, dim, generator=gen).to(device).requires_grad_() for _ in range(2)
        )
        target_cats = torch.randn(rows, dim, generator=gen).to(device)
        y = torch.randn(n if stage == "pretrain" else rows, dim, generator=gen).to(device)
        out.append((items, cats, lengths.to(device), target_cats, y))
    return out


def _decoder(stage: str, dim: int, cap: int, device: torch.device) -> GenerativeDecoder:
    torch.manual_seed(0)
    layers = 2 if stage == "pretrain" else 1
    return GenerativeDecoder(dim, cap + 1, num_layers=layers).to(device)


def _forward(decoder: GenerativeDecoder, stage: str, batch) -> torch.Tensor:
    items, cats, lengths, target_cats, _ = batch
    if stage == "pretrain":
        return decoder.sequence(items, cats, lengths)
    return decoder.target(items, cats, lengths, target_cats)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).norm() / expected.norm())


def check_packed(device: torch.device) -> list[dict]:
    """Packed against padded on ``device``: outputs and the embeddings' gradients."""
    rows = []
    for stage, dim in (("pretrain", 16), ("pretrain", 64), ("target", 16)):
        batch = _batches(stage, dim, 300, 48, device, seed=11)[0]
        decoder = _decoder(stage, dim, 300, device)
        results = {}
        for layout, precision in (("padded", "fp32"), ("packed", "fp32"), ("packed", "bf16")):
            decoder.layout = layout
            with _autocast(device, precision):
                out = _forward(decoder, stage, batch)
            # a fixed random direction: the square of a LayerNorm output sums to a constant
            (grad,) = torch.autograd.grad((out.float() * batch[4]).sum(), batch[0])
            results[(layout, precision)] = (out.detach(), grad)
        base = results[("padded", "fp32")]
        for key in (("packed", "fp32"), ("packed", "bf16")):
            rows.append(
                {
                    "stage": stage,
                    "dim": dim,
                    "layout": key[0],
                    "precision": key[1],
                    "output_rel_error": _relative_error(results[key][0], base[0]),
                    "grad_rel_error": _relative_error(results[key][1], base[1]),
                }
            )
            print(rows[-1], flush=True)
    return rows


def time_case(
    stage: str, dim: int, cap: int, rows: int, layout: str, precision: str, device, steps: int
) -> dict:
    batches = _batches(stage, dim, cap, rows, device, seed=cap + rows)
    decoder = _decoder(stage, dim, cap, device)
    decoder.layout = "padded" if layout == LONGEST_ROW else layout
    if layout == LONGEST_ROW:  # what the padded layout did before: read the longest row
        decoder.padded_width = lambda device: None
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = _forward(decoder, stage, batch)
        torch.nn.functional.mse_loss(out.float(), batch[4]).backward()
        optimizer.step()

    graphs = _graphs()
    start = time.perf_counter()
    step(batches[0])
    _sync(device)
    first = time.perf_counter() - start
    for batch in batches[1:] + batches:  # warm-up: every shape at least once (compiles)
        step(batch)
    _sync(device)
    times = []
    for i in range(steps):
        batch = batches[i % BATCHES]
        start = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = statistics.mean(int(b[2].sum()) for b in batches)
    row = {
        "stage": stage,
        "dim": dim,
        "cap": cap,
        "rows": rows,
        "layout": layout,
        "precision": precision,
        "mean_tokens": tokens,
        "step_ms": seconds * 1e3,
        "first_step_s": first,
        "graphs_compiled": _graphs() - graphs,
        "throughput": (tokens if stage == "pretrain" else rows) / seconds,
        "unit": "tokens/s" if stage == "pretrain" else "examples/s",
    }
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    return row


def _graphs() -> int:
    """Graphs compiled so far in this process (dynamo's count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync_free(device: torch.device) -> dict:
    """One warmed-up step per stage and layout (padded to the cap, packed) with host reads
    made errors."""
    result = {}
    for stage in ("pretrain", "target"):
        for layout in ("padded", "packed"):
            batch = _batches(stage, 16, 200, 64, device, seed=5)[0]
            decoder = _decoder(stage, 16, 200, device)
            decoder.layout = layout
            out = _forward(decoder, stage, batch)  # warm-up: compilation may read the device
            out.float().square().mean().backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = _forward(decoder, stage, batch)
                out.float().square().mean().backward()
                result[f"{stage} {layout}"] = "none"
            except RuntimeError as err:
                result[f"{stage} {layout}"] = f"synchronises: {str(err).splitlines()[0][:200]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
    print(result, flush=True)
    return result


def run(device: torch.device, steps: int = 20, deadline_s: float = 420.0) -> Path:
    """All cases on ``device``; cases left when ``deadline_s`` has passed are skipped (named
    in the results) so that a bounded GPU lease still writes its table."""
    began = time.perf_counter()
    if device.type == "cuda":
        # the cases share the compiled kernel (one per dtype and head width); a new total
        # length should not recompile (dynamic shapes), and if it does the count shows it
        torch._dynamo.config.recompile_limit = 64
    checks = check_packed(device) if device.type == "cuda" else []
    syncs = sync_free(device) if device.type == "cuda" else {}
    layouts = ("padded", LONGEST_ROW, "packed") if device.type == "cuda" else ("padded", "groups")
    rows, skipped = [], []
    for case in CASES:
        for layout in layouts:
            for precision in ("fp32", "bf16"):
                if time.perf_counter() - began > deadline_s:
                    skipped.append([*case, layout, precision])
                    continue
                try:
                    rows.append(time_case(*case, layout, precision, device, steps))
                except Exception as err:  # noqa: BLE001 - a failing case is a result too
                    rows.append(
                        dict(zip(("stage", "dim", "cap", "rows"), case, strict=True))
                        | {"layout": layout, "precision": precision, "error": repr(err)[:300]}
                    )
                print(rows[-1], flush=True)
    name = f"decoder_cost_{device.type}"
    what = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    payload = {
        "device": what,
        "torch": torch.__version__,
        "checks": checks,
        "sync": syncs,
        "rows": rows,
        "skipped": skipped,
    }
    return write_results(name, payload, _table(what, rows, checks, syncs, skipped, steps))


def _table(what: str, rows: list[dict], checks, syncs, skipped, steps: int) -> str:
    lines = [
        f"Device: {what}, torch {torch.__version__}. The decoder alone (pure PyTorch): "
        f"forward + backward + Adam, median of {steps} steps over 4 batches of different "
        "total length, after every batch ran twice (compilation excluded; first_step_s "
        "includes it). gain = throughput over padded fp32 of the same case.",
        "",
        "| stage | dim | cap x rows | mean tokens | layout | precision | ms/step | throughput | "
        "gain | first step s | graphs compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = f"| {r['stage']} | {r['dim']} | {r['cap']} x {r['rows']} |"
        if "error" in r:
            lines.append(f"{case} | {r['layout']} | {r['precision']} | error: {r['error']} |||")
            continue
        base = next(
            (
                x
                for x in rows
                if (x["stage"], x["dim"], x["cap"]) == (r["stage"], r["dim"], r["cap"])
                and (x["layout"], x["precision"]) == ("padded", "fp32")
                and "error" not in x
            ),
            None,
        )
        gain = f"{r['throughput'] / base['throughput']:.2f}x" if base else "-"
        lines.append(
            f"{case} {r['mean_tokens']:,.0f} | {r['layout']} | {r['precision']} | "
            f"{r['step_ms']:.1f} | {r['throughput']:,.0f} {r['unit']} | {gain} | "
            f"{r['first_step_s']:.1f} | {r['graphs_compiled']} |"
        )
    if checks:
        lines += ["", "Packed against padded fp32 (relative error, outputs / gradients):", ""]
        lines += [
            f"- {c['stage']} dim {c['dim']} {c['layout']} {c['precision']}: "
            f"{c['output_rel_error']:.1e} / {c['grad_rel_error']:.1e}"
            for c in checks
        ]
    if syncs:
        lines += ["", f"Host synchronisation in a step: {syncs}"]
    if skipped:
        lines += ["", f"Skipped (time limit): {skipped}"]
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(run(torch.device(args.device)).read_text())


if __name__ == "__main__":
    main()
