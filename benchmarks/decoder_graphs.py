"""The decoder's padded training step captured as one CUDA graph, against the same step run
eagerly: is the graph the way past the launch overhead that makes short histories host-bound on
a GPU (``benchmarks/results/decoder_cost_cuda.md``: a packed step at cap 50 is 346 launches,
23 ms of CPU against 3.3 ms of GPU work)?

    python -m benchmarks.decoder_graphs --device cuda     # results/decoder_graphs_cuda.md

On CUDA the padded layout pads every batch to the history cap (``GenerativeDecoder.
padded_width``), so from the padded tensors on, a step has the same shapes every batch: the
forward, the loss, the backward (parameters and the padded inputs' gradients, as the tables
would get them) and a ``capturable`` Adam step are captured once and replayed. Outside the
graph each step copies the batch into the graph's input buffers (padding on the way) and
gathers the inputs' gradients back to the jagged rows. The eager baseline is
:func:`benchmarks.decoder_layouts.time_case` with layout ``padded`` (same batches, same
decoder, same loss: the mean squared distance to a random target over the real tokens). Before
timing, the graph's loss and input gradients on one batch are checked against eager ones from
the same parameters. Pure PyTorch (no TorchRec): runs on a GPU machine with only torch; CUDA
only (CUDA graphs).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import write_results
from benchmarks.decoder_layouts import (
    BATCHES,
    CASES,
    _autocast,
    _batches,
    _decoder,
    _forward,
    time_case,
)
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.models.jagged import row_positions, to_padded

WARM_UP = 3  # eager iterations on a side stream before capture (allocations settle)


class GraphedStep:
    """One training step of ``decoder`` from padded inputs, captured as a CUDA graph.

    ``run(batch)`` copies a jagged batch into the graph's buffers, replays, and returns the
    jagged inputs' gradients (items, categories) and the loss, all still on the device.
    """

    def __init__(
        self, decoder: GenerativeDecoder, stage: str, rows: int, cap: int, bf16: bool
    ) -> None:
        dim, device = decoder.dim, decoder.position.weight.device
        self.decoder, self.stage, self.cap, self.bf16 = decoder, stage, cap, bf16
        self.items = torch.zeros(rows, cap, dim, device=device, requires_grad=True)
        self.cats = torch.zeros(rows, cap, dim, device=device, requires_grad=True)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.target_cats = torch.zeros(rows, dim, device=device)
        y_shape = (rows, cap, dim) if stage == "pretrain" else (rows, dim)
        self.y = torch.zeros(y_shape, device=device)
        self.optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3, capturable=True)
        self.graph = torch.cuda.CUDAGraph()
        self.loss: torch.Tensor | None = None

    def _body(self) -> torch.Tensor:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
            if self.bf16
            else contextlib.nullcontext()
        )
        with autocast:
            if self.stage == "pretrain":
                out = self.decoder.forward_sequence(self.items, self.cats)
            else:
                out = self.decoder.forward_target(
                    self.items, self.cats, self.lengths, self.target_cats
                )
        if self.stage == "pretrain":  # the mean over real tokens, as the eager step's
            keep = torch.arange(self.cap, device=out.device) < self.lengths.unsqueeze(1)
            keep = keep.unsqueeze(2)
            loss = ((out.float() - self.y) ** 2 * keep).sum() / (keep.sum() * out.shape[2])
        else:
            loss = torch.nn.functional.mse_loss(out.float(), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _load(self, batch) -> None:
        items, cats, lengths, target_cats, y = batch
        with torch.no_grad():
            self.items.copy_(to_padded(items.detach(), lengths, self.cap))
            self.cats.copy_(to_padded(cats.detach(), lengths, self.cap))
            self.lengths.copy_(lengths)
            self.target_cats.copy_(target_cats)
            self.y.copy_(to_padded(y, lengths, self.cap) if self.stage == "pretrain" else y)

    def capture(self, batch) -> None:
        self._load(batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARM_UP):
                self.optimizer.zero_grad(set_to_none=True)
                self.items.grad = self.cats.grad = None
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.items.grad = self.cats.grad = None
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def run(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._load(batch)
        self.graph.replay()
        lengths = batch[2]
        rows, positions = row_positions(lengths, batch[0].shape[0])
        return self.items.grad[rows, positions], self.cats.grad[rows, positions], self.loss


def _eager_reference(stage: str, dim: int, cap: int, batch, bf16: bool):
    """Loss and input gradients of one eager step from the benchmark's initial parameters."""
    decoder = _decoder(stage, dim, cap, batch[0].device)
    decoder.layout = "padded"
    items, cats = (x.detach().clone().requires_grad_() for x in batch[:2])
    with _autocast(items.device, "bf16" if bf16 else "fp32"):
        out = _forward(decoder, stage, (items, cats, *batch[2:]))
    loss = torch.nn.functional.mse_loss(out.float(), batch[4])
    loss.backward()
    return loss.detach(), items.grad, cats.grad


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def time_graphed(
    stage: str, dim: int, cap: int, rows: int, precision: str, device, steps: int
) -> dict:
    batches = _batches(stage, dim, cap, rows, device, seed=cap + rows)
    decoder = _decoder(stage, dim, cap, device)
    initial = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    bf16 = precision == "bf16"
    step = GraphedStep(decoder, stage, rows, cap, bf16)
    start = time.perf_counter()
    step.capture(batches[0])
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    with torch.no_grad():  # back to the initial parameters for the check (same storage)
        for name, value in decoder.state_dict().items():
            value.copy_(initial[name])
    items_grad, cats_grad, loss = step.run(batches[0])
    ref_loss, ref_items, ref_cats = _eager_reference(stage, dim, cap, batches[0], bf16)
    errors = {
        "loss": _relative(loss, ref_loss),
        "items_grad": _relative(items_grad, ref_items),
        "cats_grad": _relative(cats_grad, ref_cats),
    }
    for batch in batches:
        step.run(batch)
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        begin = time.perf_counter()
        step.run(batches[i % BATCHES])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    tokens = statistics.mean(int(b[2].sum()) for b in batches)
    return {
        "stage": stage,
        "dim": dim,
        "cap": cap,
        "rows": rows,
        "layout": "padded, CUDA graph",
        "precision": precision,
        "mean_tokens": tokens,
        "step_ms": seconds * 1e3,
        "capture_s": capture_s,
        "errors": errors,
        "throughput": (tokens if stage == "pretrain" else rows) / seconds,
        "unit": "tokens/s" if stage == "pretrain" else "examples/s",
    }


def run(device: torch.device, steps: int = 20, deadline_s: float = 300.0) -> Path:
    if device.type != "cuda":
        raise SystemExit("decoder_graphs needs a CUDA device (CUDA graphs)")
    began = time.perf_counter()
    rows, skipped = [], []
    for case in CASES:
        for precision in ("fp32", "bf16"):
            if time.perf_counter() - began > deadline_s:
                skipped.append([*case, precision])
                continue
            for timer in (time_case, time_graphed):
                try:
                    if timer is time_case:
                        row = time_case(*case, "padded", precision, device, steps)
                    else:
                        row = time_graphed(*case, precision, device, steps)
                except Exception as err:  # noqa: BLE001 - a failing case is a result too
                    row = dict(zip(("stage", "dim", "cap", "rows"), case, strict=True)) | {
                        "layout": "padded" if timer is time_case else "padded, CUDA graph",
                        "precision": precision,
                        "error": repr(err)[:300],
                    }
                rows.append(row)
                print(row, flush=True)
    what = torch.cuda.get_device_name()
    payload = {"device": what, "torch": torch.__version__, "rows": rows, "skipped": skipped}
    return write_results("decoder_graphs_cuda", payload, _table(what, rows, skipped, steps))


def _table(what: str, rows: list[dict], skipped: list, steps: int) -> str:
    lines = [
        f"Device: {what}, torch {torch.__version__}. The decoder alone (pure PyTorch): one "
        f"training step (forward, backward, Adam), median of {steps} steps over 4 batches of "
        "different total length; the padded step run eagerly against the same step captured "
        "as one CUDA graph (batch copied into its buffers and input gradients gathered back "
        "outside it, counted). Errors: the graph's loss and input gradients against an eager "
        "step from the same parameters (relative).",
        "",
        "| stage | dim | cap x rows | precision | eager ms/step | graph ms/step | speed-up | "
        "capture s | errors: loss / items grad |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for graphed in (r for r in rows if r["layout"] == "padded, CUDA graph"):
        case = (graphed["stage"], graphed["dim"], graphed["cap"], graphed["rows"])
        eager = next(
            r
            for r in rows
            if r["layout"] == "padded"
            and (r["stage"], r["dim"], r["cap"], r["rows"]) == case
            and r["precision"] == graphed["precision"]
        )
        head = f"| {case[0]} | {case[1]} | {case[2]} x {case[3]} | {graphed['precision']} |"
        if "error" in graphed or "error" in eager:
            lines.append(f"{head} error: {graphed.get('error') or eager.get('error')} |||||")
            continue
        e = graphed["errors"]
        lines.append(
            f"{head} {eager['step_ms']:.2f} | {graphed['step_ms']:.2f} | "
            f"{eager['step_ms'] / graphed['step_ms']:.2f}x | {graphed['capture_s']:.1f} | "
            f"{e['loss']:.1e} / {e['items_grad']:.1e} |"
        )
    if skipped:
        lines += ["", f"Skipped (time limit): {skipped}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(run(torch.device(args.device), args.steps).read_text())


if __name__ == "__main__":
    main()
