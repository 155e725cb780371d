"""Every random stream of a rank as a checkpoint can hold it: tensors and plain numbers only,
so that loading it runs no code."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random stream's state as tensors and plain numbers only, so that a checkpoint's
    ``rng-rank*.pt`` loads with ``torch.load(weights_only=True)``, which runs no code."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    for name, g in generators.items():
        g.set_state(state["generators"][name])
