"""Jagged <-> padded conversions for flat per-row embeddings (differentiable)."""

from __future__ import annotations

import functools

import torch


def row_positions(
    lengths: torch.Tensor, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, position within row) of every element of a jagged batch; ``total`` (the
    number of elements, when the caller knows it from a shape) spares reading it from the
    device."""
    rows = torch.repeat_interleave(
        torch.arange(len(lengths), device=lengths.device), lengths, output_size=total
    )
    offsets = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(len(rows), device=lengths.device) - offsets[rows]
    return rows, positions


def to_padded(
    values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None
) -> torch.Tensor:
    """[N, D] jagged values -> [B, L, D] zero-padded, L = max length (or ``max_len``: then
    nothing is read from the device).

    Runs fbgemm's ``jagged_to_padded_dense`` (forward and backward one kernel each, cheaper
    than scattering into zeros and gathering the gradient back: ``benchmarks/README.md``)
    where fbgemm has the op for the device, else the scatter.
    """
    lengths = lengths.long()
    width = int(lengths.max()) if max_len is None and len(lengths) else (max_len or 0)
    width = max(width, 1)
    if values.dim() == 2 and _has_jagged_kernel(values.device.type):
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [width], 0.0)
    out = values.new_zeros((len(lengths), width) + tuple(values.shape[1:]))
    rows, positions = row_positions(lengths, values.shape[0])
    out[rows, positions] = values
    return out


@functools.cache
def _has_jagged_kernel(device_type: str) -> bool:
    """fbgemm's jagged kernels are registered for the device type (CPU and CUDA builds; not
    meta)."""
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    except ImportError:  # pragma: no cover - fbgemm is a declared dependency
        return False
    return hasattr(torch.ops.fbgemm, "jagged_to_padded_dense")


def mean_pool(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each row's [N, D] values; rows with no element give zeros."""
    lengths = lengths.long()
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    total = values.new_zeros(len(lengths), values.shape[1]).index_add_(0, rows, values)
    return total / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)


def length_groups(
    lengths: torch.Tensor, slack: float = 0.25, min_tokens: int = 2048
) -> list[torch.Tensor]:
    """Row indices in groups of similar length, longest first, for padding each group alone.

    A group grows (rows sorted by length) until it holds at least ``min_tokens`` padded
    positions and one more row would make its padding exceed ``slack`` of its real elements:
    few groups for short batches (each group is one more kernel launch), little padding for
    long, uneven ones.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    values = lengths[order].tolist()
    groups, start, real = [], 0, 0
    for i, length in enumerate(values):
        longest, count = values[start], i - start
        if (
            count
            and longest * count >= min_tokens
            and longest * (count + 1) > (1 + slack) * (real + length)
        ):
            groups.append(order[start:i])
            start, real = i, 0
        real += length
    groups.append(order[start:])
    return groups
