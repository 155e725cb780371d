"""What docs/contributing.md promises: a backbone is one class and one registration, and then it
trains, exports and serves; every backbone, built in or added, goes through export (dnn and
dcnv2_ta in conftest's artifacts, dcnv2 and an added one here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
from genctr_rec.models.backbones import BACKBONES, Backbone, register_backbone
from genctr_rec.serving.export import export_run
from genctr_rec.serving.predictor import Predictor, Request


class ToyBackbone(Backbone):
    """The smallest backbone: one linear layer over x0, then the shared final layer."""

    def __init__(self, in_features: int, hidden=(8,), **head) -> None:
        super().__init__(hidden, **head)
        self.layer = nn.Linear(in_features, hidden[-1])

    def body(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(x0))


@pytest.fixture(scope="module")
def toy_registered():
    register_backbone("toy", ToyBackbone)
    yield
    BACKBONES.pop("toy", None)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["dcnv2", "toy"])  # dnn, dcnv2_ta: conftest's artifacts
def test_every_backbone_trains_exports_and_serves(
    toy_registered, backbone: str, toy_synth: Path, toy_pretrained: Path, tmp_path: Path
) -> None:
    """A few steps of GenCTR (PS + MI) on each backbone, exported: the artifact's scores on
    the test split match the trained model's (export's own parity gate), and it serves."""
    from genctr_rec.training.finetune import finetune

    cfg = RunConfig(
        "finetune",
        str(toy_synth),
        ModelConfig(),
        TrainConfig(steps=3, batch_size=128, valid_fraction=0, seed=5),
        backbone=backbone,
        transfer="ps_mi",
        init_from=str(toy_pretrained),
    )
    finetune(cfg, tmp_path / "run")
    meta = export_run(tmp_path / "run", tmp_path / "artifact", compile_aoti="none")
    assert meta["backbone"] == backbone and meta["parity"]["max_abs_diff"] <= 1e-5
    features = {"user_segment": 1, "user_activity": 2.0, "user_interests": [3]}
    request = Request([1, 2, 3], None, 4, [5, 6], features=features)
    scores = Predictor(tmp_path / "artifact").score(request)
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))


def test_a_backbone_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("dnn", ToyBackbone)
    with pytest.raises(TypeError, match="Backbone"):
        register_backbone("not-a-backbone", nn.Linear)
