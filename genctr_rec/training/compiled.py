"""``--compile``: the dense part of fine-tuning's step through ``torch.compile``.

Why: on CPU a GenCTR step is, besides its GEMMs, dozens of small memory-bound operations (the
decoder's LayerNorm, scores, mask and softmax over the padded history, the cross network's
products and sums over [B, 178]) that eager PyTorch runs one pass each; Inductor fuses them.
The step gets cheaper after a one-time compile, and end to end the gain was within the
benchmark machine's noise (``benchmarks/results/finetune_speed.md``, ``benchmarks/README.md``),
so it is opt-in: for jobs long enough to repay the compile, and a start for GPUs, where a step
of small kernels is launch-bound.

What is compiled: the backbone, and the decoder's g(s, c) from the padded history; TorchRec's
lookups stay as they are (fbgemm kernels with their fused optimizer). Histories are padded to
the cap (as on CUDA), so one graph serves every full batch; a batch of another size (an epoch's
last) and evaluation run eagerly instead of compiling again. When compiling fails (Inductor on
CPU needs a C++ compiler), the step stays eager and the log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CompiledForward:
    """Stands in for ``module.forward``: the compiled function for training calls whose first
    argument has the batch size of the first such call, the eager one otherwise.

    Attributes:
        compiled_calls: training calls that ran compiled (the tests read it).
        failed: compiling raised; every later call runs eagerly.
    """

    def __init__(self, module: nn.Module, eager: Callable[..., Any]) -> None:
        self.module = module
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=False)
        self.batch_size: int | None = None
        self.compiled_calls = 0
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch_size = args[0].shape[0]
        training = self.module.training and torch.is_grad_enabled()
        if self.failed or not training or batch_size != (self.batch_size or batch_size):
            return self.eager(*args, **kwargs)
        if self.compiled_calls == 0:
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any backend failure: run as before
                self.failed = True
                logger.warning(
                    "--compile: compiling %s failed, running it eagerly (%s: %s)",
                    type(self.module).__name__,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                return self.eager(*args, **kwargs)
            self.batch_size = batch_size
        else:
            out = self.compiled(*args, **kwargs)
        self.compiled_calls += 1
        return out


def compile_dense_step(model: nn.Module, history_cap: int) -> list[CompiledForward]:
    """Compile ``model``'s (a :class:`~genctr_rec.models.ctr.CTRModel`) backbone and its
    decoder's g(s, c) in place (state-dict keys unchanged) and pad its histories to
    ``history_cap``; returns the compiled forwards."""
    model.history_cap = history_cap
    compiled = [CompiledForward(model.backbone, model.backbone.forward)]
    model.backbone.forward = compiled[0]
    decoder = model.decoder
    if decoder is not None:
        compiled.append(CompiledForward(decoder, decoder.forward_target_summed))
        decoder.forward_target_summed = compiled[1]
    logger.info(
        "--compile: %s compiled at the first full batch (histories padded to %d)",
        " and ".join(["the backbone"] + (["g(s, c)"] if decoder is not None else [])),
        history_cap,
    )
    return compiled
