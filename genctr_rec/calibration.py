"""Platt scaling: click probabilities that mean what they say.

Ads bid on pCTR, so a model's scores must be calibrated, not only ranked. After selection a
fine-tuning run fits ``p = sigmoid(scale * logit + bias)`` on its validation rows (two numbers,
so a slice of thousands of rows pins them down); the test figures, ``genctr evaluate`` and the
exported artifact apply the same two numbers. With ``scale > 0`` the order of the scores, and so
AUC and GAUC, is unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from genctr_rec.config import ConfigError
from genctr_rec.storage import Location, first_line, location, write_json

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(scale * logit + bias)``; the identity is ``Calibration()``."""

    scale: float = 1.0
    bias: float = 0.0
    method: str = "none"
    fitted_on: str = ""
    rows: int = 0
    logloss_before: float | None = None
    logloss_after: float | None = None

    def probabilities(self, logits: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return torch.sigmoid(logits * self.scale + self.bias)
        return 1.0 / (1.0 + np.exp(-(logits * self.scale + self.bias)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Calibration:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in payload.items() if k in known})

    def write(self, run: Location) -> None:
        write_json(location(run) / CALIBRATION_FILE, self.to_json())

    @classmethod
    def of_run(cls, run: str | Path) -> Calibration:
        """The run's fitted calibration; the identity for a run without one (``--calibrate
        none``, no validation, or a run of genctr-rec 0.10 and before)."""
        path = location(run) / CALIBRATION_FILE
        if not path.exists():
            return cls()
        try:
            calibration = cls.from_json(json.loads(path.read_text()))
            scale, bias = float(calibration.scale), float(calibration.bias)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{path}: not a calibration ({first_line(exc)}); refit it with a fine-tuning "
                "run or remove the file to score uncalibrated"
            ) from exc
        if not (np.isfinite(scale) and np.isfinite(bias) and scale > 0):
            raise ConfigError(
                f"{path}: scale {calibration.scale!r} and bias {calibration.bias!r} must be finite"
                " numbers with scale > 0 (a scale <= 0 would reverse the scores' order)"
            )
        return calibration


def _logloss(logits: torch.Tensor, labels: torch.Tensor, scale: Any, bias: Any) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits * scale + bias, labels)


def fit_platt(logits: np.ndarray, labels: np.ndarray, fitted_on: str = "") -> Calibration:
    """Scale and bias minimising LogLoss on ``(logits, labels)`` (float64 L-BFGS from the
    identity). Falls back to the identity, with a warning, where the rows cannot say anything
    (one label class) or the fit would reverse the order (scale <= 0: the model ranks worse
    than chance there)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    positives = float(y.sum())
    if len(y) == 0 or positives in (0.0, float(len(y))):
        logger.warning("calibration: %d rows with one label class; scores left as they are", len(y))
        return Calibration(fitted_on=fitted_on, rows=len(y))
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([scale, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _logloss(z, y, scale, bias)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        before = float(_logloss(z, y, 1.0, 0.0))
        after = float(_logloss(z, y, scale, bias))
    a, b = float(scale.detach()), float(bias.detach())
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0 or after > before:
        logger.warning(
            "calibration: the fit (scale %.4g, bias %.4g) would not help; scores left as they are",
            a,
            b,
        )
        return Calibration(fitted_on=fitted_on, rows=len(y), logloss_before=before)
    return Calibration(a, b, "platt", fitted_on, len(y), before, after)
