"""Export: the artifact scores like the trained model (fp32 within 1e-5, int8 within 0.002 AUC,
tables >= 3.5x smaller from dim 64), is checked on load, and is written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from genctr_rec.config import ConfigError
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.serving import ArtifactError
from genctr_rec.serving.artifact import export_run, load_artifact, load_trained
from genctr_rec.serving.predictor import Predictor, Request


@pytest.mark.parametrize("name", ["genctr", "ta64"])
def test_fp32_export_matches_the_trained_model(artifacts: dict, name: str) -> None:
    parity = artifacts[f"{name}-none"]["meta"]["parity"]
    assert parity["rows"] > 1000
    assert parity["max_abs_diff"] <= 1e-5
    assert parity["exported"]["auc"] == pytest.approx(parity["trained"]["auc"], abs=1e-6)
    assert parity["table_shrink"] == 1.0


def test_fp32_predictor_scores_like_the_trained_model(
    artifacts: dict, runs: dict[str, Path], toy_synth: Path
) -> None:
    """Independent of export's own check: requests built from test rows, scored one by one."""
    cfg, trained = load_trained(runs["genctr"])
    schema = FeatureSchema.from_json(cfg.features)
    assert [f.name for f in schema.features] == [
        "user_segment",
        "user_activity",
        "user_interests",
        "item_tier",
    ]
    predictor = Predictor(artifacts["genctr-none"]["path"])
    reader = ImpressionReader(toy_synth, "test", 40, shuffle=False, max_history=50, features=schema)
    table = pq.read_table(toy_synth / "test").slice(0, 40).to_pylist()
    batch = next(iter(reader))
    kjt = batch.sparse_features
    with torch.no_grad():
        expected = torch.sigmoid(trained(*batch.model_inputs())).numpy()
    offsets = kjt["hist_item_ids"].offsets()
    for i in range(40):
        start, stop = int(offsets[i]), int(offsets[i + 1])
        row = table[i]
        request = Request(
            history_items=kjt["hist_item_ids"].values()[start:stop].tolist(),
            history_categories=kjt["hist_category_ids"].values()[start:stop].tolist(),
            query_category=int(kjt["query_category_id"].values()[i]),
            candidate_items=[int(kjt["item_id"].values()[i])],
            candidate_categories=[int(kjt["category_id"].values()[i])],
            user_id=row["user_id"],
            features={k: row[k] for k in ("user_segment", "user_activity", "user_interests")},
        )
        assert predictor.score(request)[0] == pytest.approx(expected[i], abs=1e-5)


@pytest.mark.parametrize("name,dim", [("genctr", 16), ("ta64", 64)])
def test_int8_export_keeps_auc_and_shrinks_tables(artifacts: dict, name: str, dim: int) -> None:
    parity = artifacts[f"{name}-int8"]["meta"]["parity"]
    assert abs(parity["auc_change"]) < 0.002
    assert 0 < parity["max_abs_diff"] < 0.05  # quantised: close, not equal
    # fbgemm int8 row: dim bytes + fp16 scale and bias; fp32 row: 4 * dim bytes
    assert parity["table_shrink"] == pytest.approx(4 * dim / (dim + 4))
    if dim >= 64:
        assert parity["table_shrink"] >= 3.5


def test_artifact_is_self_describing(artifacts: dict) -> None:
    art = artifacts["genctr-int8"]["path"]
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["quantize"] == "int8" and meta["model_integration"] is True
    assert meta["num_items"] == 2000 and meta["num_categories"] == 20
    assert meta["stack"]["torchrec"] == "1.8.0"
    loaded = load_artifact(art)
    assert loaded.item_categories.shape == (2000,)
    assert set(json.loads((art / "manifest.json").read_text())["files"]) == {
        "model.pt",
        "item_categories.npy",
        "item_features.npz",
        "artifact.json",
    }
    assert loaded.catalogue.scalars["item_tier"].shape == (2000,)
    assert [f["name"] for f in meta["features"]["features"]][-1] == "item_tier"


def test_damaged_artifact_is_refused(artifacts: dict, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifacts["genctr-none"]["path"], art)
    model = art / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt fails its SHA-256 check"):
        load_artifact(art)
    (art / "item_categories.npy").unlink()
    with pytest.raises(ArtifactError, match="item_categories.npy is missing"):
        load_artifact(art)


def test_export_refuses_and_leaves_nothing(runs: dict[str, Path], artifacts: dict, tmp_path):
    existing = artifacts["genctr-none"]["path"]
    before = sorted(p.name for p in existing.parent.iterdir())
    with pytest.raises(FileExistsError):
        export_run(runs["genctr"], existing)
    assert sorted(p.name for p in existing.parent.iterdir()) == before
    with pytest.raises(ConfigError, match="not here; pass --data"):
        export_run(runs["genctr"], tmp_path / "x", data=tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()


def test_export_from_a_run_trained_elsewhere(runs: dict[str, Path], tmp_path: Path) -> None:
    """Export reads a checkpoint without the run's process group or plan: here through a
    moved run directory, with --data given because the recorded path no longer exists."""
    moved = tmp_path / "moved"
    shutil.copytree(runs["genctr"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    data = cfg["data"]
    cfg["data"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    meta = export_run(moved, tmp_path / "art", data=data)
    assert meta["parity"]["max_abs_diff"] <= 1e-5
    features = {"user_segment": 1, "user_activity": 12.0, "user_interests": [3]}
    scores = Predictor(tmp_path / "art").score(
        Request([1, 2], [0, 0], 0, [3, 4, 5], features=features)
    )
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
