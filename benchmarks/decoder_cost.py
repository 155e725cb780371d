"""Decoder cost against history length: pre-training tokens/s and fine-tuning examples/s at
history 50, 200 and 1000, jagged (rows grouped by length, no cross-row padding) against padding
the whole batch to its longest row.

    python -m benchmarks.decoder_cost [--histories 50 200 1000] [--steps 15]

The decoder alone (pure PyTorch, no TorchRec: it runs on a GPU machine that has only torch) in
each layout (padded, packed, and on CPU length groups), fp32 and under bf16 autocast:
``python -m benchmarks.decoder_layouts --device cuda`` (results/decoder_cost_cuda).

Whole stage models (unsharded tables of 100k items, width 16; the paper's one-layer decoder),
forward + backward per step, no optimizer step (the same in every variant). Row lengths follow
``1 + Exponential(mean H / 3)`` capped at H: many short histories, a few at the cap, as in
behaviour logs. Pre-training: 32 sequences per batch, 16 negatives per target; fine-tuning:
DNN + model integration, 1024 impressions per batch.

Variants: ``padded, explicit mask`` (the decoder before this benchmark: a boolean mask through
SDPA), ``padded, causal kernel`` (SDPA's fused causal path, whole batch padded) and ``jagged``
(causal kernel, rows grouped by length: the CPU default for pre-training and for g(s, c)
with more than one decoder layer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.common import write_results
from genctr_rec.models.decoder import GenerativeDecoder

ITEMS, CATEGORIES = 100_000, 1000


class _MaskedDecoder(GenerativeDecoder):
    """The previous pre-training path: the causal pattern as an explicit boolean mask."""

    def forward_sequence(self, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        memory = self._tokens(items, cats)
        queries = cats + self.position.weight[:length].unsqueeze(0)
        mask = torch.ones(length, length + 1, dtype=torch.bool).tril().unsqueeze(0)
        return self._run(queries, memory, mask)


def row_lengths(rng: np.random.Generator, n: int, history: int) -> torch.Tensor:
    """Long-tailed history lengths in [1, history] (what the decoder benchmarks draw)."""
    return torch.from_numpy(
        np.minimum(history, 1 + rng.exponential(history / 3, n).astype(np.int64))
    )


def _decoder(variant: str, history: int) -> GenerativeDecoder:
    cls = _MaskedDecoder if variant == "padded, explicit mask" else GenerativeDecoder
    return cls(16, history + 1, layout="groups" if variant == "jagged" else "padded")


def _time(step, steps: int) -> float:
    """Median seconds per step after two warm-up steps (a mean drifts with this machine's
    +-15 % run-to-run noise more than a median does)."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pretrain_cost(variant: str, history: int, steps: int) -> dict:
    from torchrec import KeyedJaggedTensor

    from genctr_rec.data.keys import SEQ_CATEGORIES, SEQ_ITEMS
    from genctr_rec.embeddings import SharedEmbeddings
    from genctr_rec.models.ctr import PretrainModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = row_lengths(rng, 32, history)
    n = int(lengths.sum())
    model = PretrainModel(
        SharedEmbeddings(ITEMS, CATEGORIES, 16, device=torch.device("cpu")),
        _decoder(variant, history),
    )
    kjt = KeyedJaggedTensor(
        keys=[SEQ_ITEMS, SEQ_CATEGORIES],
        values=torch.from_numpy(
            np.concatenate([rng.integers(0, ITEMS, n), rng.integers(0, CATEGORIES, n)])
        ),
        lengths=torch.cat([lengths, lengths]).int(),
    )
    negatives = torch.from_numpy(rng.integers(0, ITEMS, (n, 16)))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(kjt, negatives).backward()

    seconds = _time(step, steps)
    return {
        "stage": "pretrain",
        "variant": variant,
        "history": history,
        "mean_length": float(lengths.float().mean()),
        "padding_fraction": 1 - n / (len(lengths) * int(lengths.max())),
        "step_ms": seconds * 1e3,
        "throughput": n / seconds,
        "unit": "tokens/s",
    }


def finetune_cost(variant: str, history: int, steps: int) -> dict:
    from torchrec import KeyedJaggedTensor

    from genctr_rec.data.keys import (
        HIST_CATEGORIES,
        HIST_ITEMS,
        QUERY_CATEGORY,
        TARGET_CATEGORY,
        TARGET_ITEM,
    )
    from genctr_rec.embeddings import SharedEmbeddings
    from genctr_rec.models.ctr import CTRModel

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    b = 1024
    lengths = row_lengths(rng, b, history) - 1  # fine-tuning histories may be empty
    n = int(lengths.sum())
    model = CTRModel(
        SharedEmbeddings(ITEMS, CATEGORIES, 16, device=torch.device("cpu")),
        "dnn",
        _decoder(variant, history),
    )
    ones = torch.ones(b, dtype=torch.int32)
    kjt = KeyedJaggedTensor(
        keys=[TARGET_ITEM, TARGET_CATEGORY, QUERY_CATEGORY, HIST_ITEMS, HIST_CATEGORIES],
        values=torch.from_numpy(
            np.concatenate(
                [
                    rng.integers(0, ITEMS, b),
                    rng.integers(0, CATEGORIES, 2 * b),
                    rng.integers(0, ITEMS, n),
                    rng.integers(0, CATEGORIES, n),
                ]
            )
        ),
        lengths=torch.cat([ones, ones, ones, lengths.int(), lengths.int()]),
    )
    labels = torch.from_numpy(rng.integers(0, 2, b)).float()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels).backward()

    seconds = _time(step, steps)
    return {
        "stage": "finetune",
        "variant": variant,
        "history": history,
        "mean_length": float(lengths.float().mean()),
        "padding_fraction": 1 - n / (b * max(1, int(lengths.max()))),
        "step_ms": seconds * 1e3,
        "throughput": b / seconds,
        "unit": "examples/s",
    }


VARIANTS = ("padded, explicit mask", "padded, causal kernel", "jagged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    rows = []
    for history in args.histories:
        for variant in VARIANTS:
            rows.append(pretrain_cost(variant, history, args.steps))
            print(rows[-1], flush=True)
        for variant in VARIANTS[1:]:  # fine-tuning has no causal mask to choose
            rows.append(finetune_cost(variant, history, args.steps))
            print(rows[-1], flush=True)
    lines = [
        f"Forward + backward of the whole stage model, torch threads {torch.get_num_threads()}; "
        "gain = throughput over the whole-batch padded baseline with the same kernel.",
        "",
        "| stage | history cap | mean length | padding | variant | ms/step | throughput | gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(
            x
            for x in rows
            if x["stage"] == r["stage"]
            and x["history"] == r["history"]
            and x["variant"] == "padded, causal kernel"
        )
        lines.append(
            f"| {r['stage']} | {r['history']} | {r['mean_length']:.0f} | "
            f"{r['padding_fraction']:.0%} | {r['variant']} | {r['step_ms']:.1f} | "
            f"{r['throughput']:,.0f} {r['unit']} | {r['throughput'] / base['throughput']:.2f}x |"
        )
    note = f"Median ms per step over {args.steps} steps after 2 warm-up steps, one thread.\n\n"
    md = write_results("decoder_cost", {"rows": rows, "args": vars(args)}, note + "\n".join(lines))
    print(md.read_text())


if __name__ == "__main__":
    main()
