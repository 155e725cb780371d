"""Prefetching: the same batches, positions and errors as the reader it wraps, decoded ahead."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from genctr_rec.data.prefetch import Prefetcher, prefetched
from genctr_rec.data.reader import ImpressionReader, SequenceReader
from genctr_rec.data.schema import DataFormatError
from tests.test_bad_input import _break


def _same_batch(a, b) -> None:
    for key in a.sparse_features.keys():
        assert torch.equal(a.sparse_features[key].values(), b.sparse_features[key].values()), key
        assert torch.equal(a.sparse_features[key].lengths(), b.sparse_features[key].lengths())
    for name in ("labels", "user_ids"):
        if hasattr(a, name):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def _trace(reader, epochs: int) -> list[tuple]:
    """(batch, state after it) for each batch of ``epochs`` epochs, and the state at each end."""
    out = []
    for epoch in range(epochs):
        reader.set_epoch(epoch)
        for batch in reader:
            out.append((batch, reader.state_dict()))
        out.append((None, reader.state_dict()))
    return out


@pytest.mark.parametrize("depth", [1, 3])
def test_same_batches_and_positions_as_the_reader(small_dataset: Path, depth: int) -> None:
    plain = _trace(ImpressionReader(small_dataset, "train", 40, seed=4), epochs=2)
    ahead = _trace(Prefetcher(ImpressionReader(small_dataset, "train", 40, seed=4), depth), 2)
    assert len(plain) == len(ahead) > 20
    for (a, state_a), (b, state_b) in zip(plain, ahead, strict=True):
        assert state_a == state_b
        if a is None:
            assert b is None
        else:
            _same_batch(a, b)
    assert ahead[-1][1]["epoch"] == 2 and ahead[-1][1]["batches_done"] == 0


def test_sequence_reader_too(small_dataset: Path) -> None:
    plain = _trace(SequenceReader(small_dataset, 16, seed=1), epochs=1)
    ahead = _trace(Prefetcher(SequenceReader(small_dataset, 16, seed=1), 2), epochs=1)
    for (a, state_a), (b, state_b) in zip(plain, ahead, strict=True):
        assert state_a == state_b
        if a is not None:
            _same_batch(a, b)


def test_it_decodes_ahead_while_the_loop_holds_a_batch(small_dataset: Path) -> None:
    reader = ImpressionReader(small_dataset, "train", 20, seed=0)
    batches = Prefetcher(reader, depth=3)
    it = iter(batches)
    next(it)
    deadline = time.monotonic() + 10
    while reader.state_dict()["batches_done"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    # one handed out, three queued, one more decoded and waiting for room
    assert reader.state_dict()["batches_done"] >= 4
    assert batches.state_dict()["batches_done"] == 1, "the position is the loop's, not the thread's"
    it.close()


def test_a_stopped_loop_resumes_at_its_own_position(small_dataset: Path) -> None:
    """A checkpoint taken mid-epoch and the next iteration both start after the last batch the
    loop took, however far the thread had decoded."""
    full = [b.user_ids.tolist() for b in ImpressionReader(small_dataset, "train", 30, seed=2)]
    batches = Prefetcher(ImpressionReader(small_dataset, "train", 30, seed=2), depth=4)
    head = []
    for i, batch in enumerate(batches):
        head.append(batch.user_ids.tolist())
        if i == 5:
            state = batches.state_dict()
            break
    assert state["batches_done"] == 6
    assert batches.state_dict() == state and batches.reader.state_dict() == state
    rest = [b.user_ids.tolist() for b in batches]
    assert head + rest == full
    resumed = Prefetcher(ImpressionReader(small_dataset, "train", 30, seed=2), depth=2)
    resumed.load_state_dict(state)
    assert head + [b.user_ids.tolist() for b in resumed] == full
    assert not [t for t in threading.enumerate() if t.name == "genctr-prefetch"]


def test_bad_data_fails_at_the_same_batch_with_the_same_error(small_dataset: Path) -> None:
    _break(small_dataset, "history_id_out_of_range")

    def run(reader) -> tuple[int, DataFormatError]:
        taken = 0
        with pytest.raises(DataFormatError) as info:
            for _ in reader:
                taken += 1
        return taken, info.value

    plain = run(ImpressionReader(small_dataset, "train", 32, shuffle=False))
    ahead = run(Prefetcher(ImpressionReader(small_dataset, "train", 32, shuffle=False), 2))
    assert ahead[0] == plain[0]
    assert str(ahead[1]) == str(plain[1]) and ahead[1].row == plain[1].row
    assert ahead[1].column == plain[1].column == "hist_item_ids"


def test_depth_zero_is_the_reader_itself(small_dataset: Path) -> None:
    reader = ImpressionReader(small_dataset, "train", 32)
    assert prefetched(reader, 0) is reader
    assert isinstance(prefetched(reader, 2), Prefetcher)
    assert len(prefetched(reader, 2)) == len(reader)
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(reader, 0)
