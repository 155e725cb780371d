"""The packed decoder path: layout, block mask, kernels, outputs against the padded path, and
the per-device policy that picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genctr_rec.config import BF16_MIN_HISTORY
from genctr_rec.models.decoder import (
    PACKED_MIN_HISTORY,
    PACKED_MIN_HISTORY_BF16,
    GenerativeDecoder,
    choose_layout,
)
from genctr_rec.models.jagged import row_positions, to_padded
from genctr_rec.models.packed import BLOCK, PackedLayout, packed_attention, packed_size
from tests.helpers import jagged_embeddings

D = 16
# rows crossing block edges, a row longer than two blocks, empty rows, a row of exactly a block
LENGTHS = [300, 1, 45, 0, 298, 7, 127, 12, 151, 3, 0, 128] * 2
LAYOUT_CASES = [LENGTHS, [5], [126], [127], [0, 0, 0], [2000, 3, 5], [128, 127, 129, 300]]


def _reference_mask(layout: PackedLayout) -> torch.Tensor:
    """[T, T] from the definition: same row and not later, written independently of
    :attr:`PackedLayout.dense_mask`."""
    docs = layout.documents.tolist()
    t = layout.size
    return torch.tensor([[docs[q] == docs[k] and k <= q for k in range(t)] for q in range(t)])


@pytest.mark.parametrize("lengths", LAYOUT_CASES)
def test_layout_places_each_row_bos_first_then_its_items(lengths: list[int]) -> None:
    layout = PackedLayout.build(torch.tensor(lengths), sum(lengths))
    assert layout.size % BLOCK == 0 and layout.size > sum(lengths) + len(lengths)
    docs, slot = layout.documents.tolist(), 0
    for row, length in enumerate(lengths):
        assert layout.row_starts[row] == slot
        assert docs[slot : slot + length + 1] == [row] * (length + 1)
        slot += length + 1
    # every padding slot a row of its own, so padding attends to itself alone
    assert len(set(docs[slot:])) == layout.size - slot
    items = torch.tensor([s for r, n in enumerate(lengths) for s in range(1, n + 1)])
    starts = layout.row_starts[: len(lengths)]
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert torch.equal(layout.item_slots, starts[rows] + items)
    assert torch.equal(layout.query_slots, layout.item_slots - 1)
    assert torch.equal(layout.positions, items - 1)


@pytest.mark.parametrize("lengths", LAYOUT_CASES)
def test_block_mask_is_create_block_masks_with_the_same_full_blocks(lengths: list[int]) -> None:
    """The mask built from the row starts covers exactly the blocks ``create_block_mask`` finds
    by evaluating the mask everywhere, and the blocks it marks full really are full."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = PackedLayout.build(torch.tensor(lengths), sum(lengths))
    docs = layout.documents
    reference = create_block_mask(
        lambda b, h, q, k: (docs[q] == docs[k]) & (k <= q),
        None,
        None,
        layout.size,
        layout.size,
        device="cpu",
    )
    mine = layout.block_mask
    assert torch.equal(mine.to_dense(), reference.to_dense())
    dense = _reference_mask(layout)
    assert torch.equal(layout.dense_mask, dense)
    full = mine.full_kv_num_blocks[0, 0]
    for i, count in enumerate(full.tolist()):
        for j in mine.full_kv_indices[0, 0, i, :count].tolist():
            assert dense[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].all()
    assert int(full.sum()) == int(reference.full_kv_num_blocks.sum())


def test_packed_sizes_are_whole_blocks_and_few() -> None:
    sizes = {packed_size(n) for n in range(1, 200_000, 97)}
    assert all(s % BLOCK == 0 for s in sizes)
    for n in (1, 128, 129, 1025, 5000, 70_000, 199_999):
        size = packed_size(n)
        assert n <= size <= max(8 * BLOCK, 1.25 * n + BLOCK)
    assert len(sizes) < 45  # four an octave: a run meets few shapes, so few compilations


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("heads", [1, 2])
def test_both_kernels_attend_within_each_row_causally(heads: int) -> None:
    """Dense-mask SDPA and FlexAttention (eager: CPU has no compiled FlexAttention backward,
    so forward only) give each row's causal attention, computed row by row here."""
    torch.manual_seed(0)
    lengths = [300, 1, 0, 45, 130]
    layout = PackedLayout.build(torch.tensor(lengths), sum(lengths))
    width = D // heads  # 8: FlexAttention's minimum of 16 is met by zero padding
    q, k, v = (torch.randn(1, heads, layout.size, width) for _ in range(3))
    expected = torch.zeros_like(q)
    for start, length in zip(layout.row_starts.tolist(), lengths, strict=False):
        span = slice(start, start + length + 1)
        expected[:, :, span] = F.scaled_dot_product_attention(
            q[:, :, span], k[:, :, span], v[:, :, span], is_causal=True
        )
    real = sum(lengths) + len(lengths)
    dense = packed_attention(q, k, v, layout, kernel="dense")
    with torch.no_grad():
        flex = packed_attention(q, k, v, layout, kernel="flex")
    torch.testing.assert_close(dense[:, :, :real], expected[:, :, :real])
    torch.testing.assert_close(flex[:, :, :real], expected[:, :, :real])
    with pytest.raises(ValueError, match="kernel"):
        packed_attention(q, k, v, layout, kernel="fused")


def _batch(lengths: list[int], seed: int = 0):
    return jagged_embeddings(lengths, D, seed)


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_packed_decoder_equals_the_padded_one(conditional: bool, layers: int) -> None:
    """Pre-training's g for every element and fine-tuning's g(s, c): same values and gradients
    (of a random projection: a LayerNorm output's squares sum to a constant) as padding."""
    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, 301, num_layers=layers, conditional=conditional)
    items, cats, lengths = _batch(LENGTHS)
    direction = torch.randn(len(items), D)
    padded = decoder.forward_sequence(to_padded(items, lengths), to_padded(cats, lengths))
    expected = padded[row_positions(lengths)]
    got = decoder.forward_sequence_packed(items, cats, lengths)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for leaf in (items, cats):
        (want,) = torch.autograd.grad((expected * direction).sum(), leaf, retain_graph=True)
        (have,) = torch.autograd.grad((got * direction).sum(), leaf, retain_graph=True)
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4)

    targets = torch.randn(len(LENGTHS), D)
    rows_direction = torch.randn(len(LENGTHS), D)
    expected_g = decoder.forward_target(
        to_padded(items, lengths), to_padded(cats, lengths), lengths, targets
    )
    got_g = decoder.forward_target_packed(items, cats, lengths, targets)
    torch.testing.assert_close(got_g, expected_g, atol=2e-5, rtol=1e-5)
    (want,) = torch.autograd.grad((expected_g * rows_direction).sum(), items)
    (have,) = torch.autograd.grad((got_g * rows_direction).sum(), items)
    torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4)


def test_packed_path_reads_nothing_from_the_device() -> None:
    """On the meta device no value can be read: the packed path runs there whole (so it needs
    no host synchronisation on a GPU), while the padded path, which sizes its padding from the
    longest row, cannot."""
    decoder = GenerativeDecoder(D, 301, num_layers=2).to("meta")
    lengths = torch.tensor(LENGTHS, device="meta")
    n = sum(LENGTHS)
    items, cats = torch.randn(n, D, device="meta"), torch.randn(n, D, device="meta")
    assert decoder.forward_sequence_packed(items, cats, lengths).shape == (n, D)
    targets = torch.randn(len(LENGTHS), D, device="meta")
    assert decoder.forward_target_packed(items, cats, lengths, targets).shape == (len(LENGTHS), D)
    with pytest.raises((RuntimeError, NotImplementedError)):
        to_padded(items, lengths)


def test_bf16_autocast_keeps_packed_close_to_fp32() -> None:
    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, 301, num_layers=2)
    items, cats, lengths = _batch(LENGTHS, seed=3)
    reference = decoder.forward_sequence_packed(items, cats, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = decoder.forward_sequence_packed(items, cats, lengths)
    error = (low.float() - reference).norm() / reference.norm()
    assert 0 < error < 1e-2  # bf16 ran (not exact) and stayed within bf16's rounding


def test_the_policy_per_device_stage_and_history() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long, short = PACKED_MIN_HISTORY, PACKED_MIN_HISTORY - 1
    assert choose_layout("auto", cpu, "pretrain", history_cap=long) == "groups"
    assert choose_layout("auto", cpu, "target", 1) == "padded"
    assert choose_layout("auto", cpu, "target", 2) == "groups"
    assert choose_layout("auto", cuda, "pretrain", history_cap=long) == "packed"
    assert choose_layout("auto", cuda, "pretrain", history_cap=short) == "padded"
    assert choose_layout("auto", cuda, "pretrain", history_cap=long, bf16=True) == "padded"
    bf16_long = PACKED_MIN_HISTORY_BF16
    assert choose_layout("auto", cuda, "pretrain", history_cap=bf16_long, bf16=True) == "packed"
    assert choose_layout("auto", cuda, "pretrain", dropout=0.1, history_cap=long) == "padded"
    assert choose_layout("auto", cuda, "target", 2, history_cap=long) == "padded"
    assert choose_layout("packed", cpu, "target") == "packed"
    with pytest.raises(ValueError, match="unknown decoder layout"):
        GenerativeDecoder(D, 51, layout="jagged")
    decoder = GenerativeDecoder(D, 51, dropout=0.1, layout="packed").train()
    items, cats, lengths = _batch([3, 4])
    with pytest.raises(ValueError, match="no attention dropout"):
        decoder.sequence(items, cats, lengths)


def test_precision_policy_and_the_autocast_step() -> None:
    from genctr_rec.config import TrainConfig
    from genctr_rec.training.loop import bf16_autocast

    auto = TrainConfig()
    assert auto.resolved_precision(torch.device("cuda"), BF16_MIN_HISTORY) == "bf16"
    assert auto.resolved_precision(torch.device("cuda"), BF16_MIN_HISTORY - 1) == "fp32"
    assert auto.resolved_precision(torch.device("cpu"), 4000) == "fp32"
    assert TrainConfig(precision="bf16").resolved_precision(torch.device("cpu"), 50) == "bf16"

    layer = torch.nn.Linear(4, 1)
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    step = bf16_autocast(lambda batch: layer(batch).sum(), torch.device("cpu"))
    loss = step(torch.randn(3, 4))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    loss.backward()
    assert layer.weight.grad.dtype == torch.float32  # fp32 master weights


def test_a_pretraining_run_takes_the_layout_and_precision_flags(toy_synth, tmp_path) -> None:
    """``--decoder-layout packed --precision bf16`` reach the run (its config and log) and
    train to about the loss of the CPU default (groups, fp32): same model, bf16 rounding."""
    import json
    import subprocess
    import sys

    def pretrain(out, *flags):
        proc = subprocess.run(
            [sys.executable, "-m", "genctr_rec.cli", "pretrain", "--data", str(toy_synth)]
            + ["--out", str(out), "--epochs", "1", "--batch-size", "64", *flags],
            text=True,
            capture_output=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr, json.loads((out / "metrics.json").read_text())

    log, packed = pretrain(tmp_path / "packed", "--decoder-layout", "packed", "--precision", "bf16")
    _, default = pretrain(tmp_path / "default")
    assert "bf16 forward" in log
    saved = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert saved["model"]["decoder_layout"] == "packed" and saved["train"]["precision"] == "bf16"
    assert packed["epoch_loss"][0] != default["epoch_loss"][0]
    assert packed["epoch_loss"][0] == pytest.approx(default["epoch_loss"][0], rel=0.02)


def test_the_decoder_reads_bf16_autocast_off_the_device() -> None:
    """Under bf16 autocast padded attention is fast, so the packed threshold rises: the
    decoder sees autocast on the batch's device (CPU here: CUDA autocast needs a GPU)."""
    from genctr_rec.models.decoder import _under_bf16_autocast

    cpu = torch.device("cpu")
    assert not _under_bf16_autocast(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _under_bf16_autocast(cpu)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _under_bf16_autocast(cpu)
    cuda = torch.device("cuda")
    decoder = GenerativeDecoder(D, PACKED_MIN_HISTORY + 1)
    assert decoder.layout_for(cuda, "pretrain") == "packed"
    decoder = GenerativeDecoder(D, PACKED_MIN_HISTORY)
    assert decoder.layout_for(cuda, "pretrain") == "padded"


def test_padding_to_the_cap_gives_the_same_outputs_and_reads_nothing(monkeypatch) -> None:
    """On CUDA the padded layout pads to the history cap (a static shape, no read of the
    longest row): same g as padding to the batch's longest row, for the stage models'
    ``sequence`` and ``target``; with it the padded path runs on the meta device too."""
    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, 301, num_layers=2, layout="padded")
    assert decoder.padded_width(torch.device("cuda")) == 300
    assert decoder.padded_width(torch.device("cpu")) is None
    items, cats, lengths = _batch(LENGTHS)
    targets = torch.randn(len(LENGTHS), D)
    longest = decoder.sequence(items, cats, lengths), decoder.target(items, cats, lengths, targets)
    monkeypatch.setattr(GenerativeDecoder, "padded_width", lambda self, device: self.max_len - 1)
    capped = decoder.sequence(items, cats, lengths), decoder.target(items, cats, lengths, targets)
    for got, expected in zip(capped, longest, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    meta = decoder.to("meta")
    items, cats = (x.detach().to("meta") for x in (items, cats))
    lengths, targets = lengths.to("meta"), targets.to("meta")
    assert meta.sequence(items, cats, lengths).shape == items.shape
    assert meta.target(items, cats, lengths, targets).shape == targets.shape
