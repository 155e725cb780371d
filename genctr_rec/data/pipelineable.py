"""TorchRec's ``Pipelineable`` for a dataclass of tensors and KJTs: moved, pinned and recorded
field by field (a field left None stays None), so that every batch type implements it once."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

import torch
from torchrec.streamable import Pipelineable

T = TypeVar("T", bound="FieldsPipelineable")


class FieldsPipelineable(Pipelineable):
    """Mixin for a ``@dataclass`` whose fields are tensors, KJTs or other pipelineables."""

    def _parts(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    def _map(self: T, fn) -> T:
        return type(self)(*(None if v is None else fn(v) for v in self._parts()))

    def to(self: T, device: torch.device, non_blocking: bool = False) -> T:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for part in self._parts():
            if part is not None:
                part.record_stream(stream)

    def pin_memory(self: T) -> T:
        return self._map(lambda t: t.pin_memory())
