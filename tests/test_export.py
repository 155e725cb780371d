"""Export: the artifact (torch.export programs, compiled by AOTInductor) scores like the trained
model and like the legacy TorchScript artifact (fp32 within 1e-5, int8 and int4 within 0.002 AUC
or refused, tables >= 3.5x smaller from dim 64), raises no deprecation warning, is checked on
load, serves on another CPU, reads 0.10's artifacts, and is written atomically."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from genctr_rec.calibration import Calibration
from genctr_rec.checkpoint import write_manifest
from genctr_rec.cli import main
from genctr_rec.compat import StackError
from genctr_rec.config import ConfigError
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.serving import ArtifactError
from genctr_rec.serving.artifact import load_artifact
from genctr_rec.serving.export import export_run, load_trained
from genctr_rec.serving.predictor import Predictor, Request
from tests.helpers import warning_record


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
        # the artifact holds the run's Platt scaling: calibrated probabilities
        logits = trained(*batch.model_inputs())
        expected = Calibration.of_run(runs["genctr"]).probabilities(logits).numpy()
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
    assert meta["format_version"] == 4 and meta["model"]["format"] == "torch.export"
    assert meta["model"]["entry_points"] == ["contexts", "score"]
    assert set(json.loads((art / "manifest.json").read_text())["files"]) == {
        "model.pt2",
        "item_categories.npy",
        "item_features.npz",
        "artifact.json",
    }
    assert loaded.catalogue.scalars["item_tier"].shape == (2000,)
    assert [f["name"] for f in meta["features"]["features"]][-1] == "item_tier"


def test_damaged_artifact_is_refused(artifacts: dict, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifacts["genctr-none"]["path"], art)
    model = art / "model.pt2"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt2 fails its SHA-256 check"):
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
    meta = export_run(moved, tmp_path / "art", data=data, compile_aoti="none")
    assert meta["parity"]["max_abs_diff"] <= 1e-5
    features = {"user_segment": 1, "user_activity": 12.0, "user_interests": [3]}
    scores = Predictor(tmp_path / "art").score(
        Request([1, 2], [0, 0], 0, [3, 4, 5], features=features)
    )
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))


FORMAT_APIS = re.compile(r"torch\.jit|TorchScript|torch\.ao\.quantization|torch\.export")


def _deprecations(raised: list[dict]) -> list[str]:
    """Deprecation notices among ``raised`` (helpers.warning_record) that concern us: raised at
    a call of ours (the warning's location is our code), or about an API of a format we write or
    read."""
    return [
        f"{w['category']}: {w['message']} ({w['filename']}:{w['lineno']})"
        for w in raised
        if w["deprecation"] and ("genctr_rec" in w["filename"] or FORMAT_APIS.search(w["message"]))
    ]


def test_the_default_artifact_is_compiled_and_deprecates_nothing(artifacts: dict) -> None:
    """The default export (AOTInductor) and serving it raise no deprecation warning at a call
    of ours nor about the APIs of the format: what this project writes has no announced end
    (the legacy TorchScript export does raise them: checked too, so the check can fail)."""
    art = artifacts["genctr-none"]
    assert art["meta"]["model"]["compiled"] == "aoti"
    assert _deprecations(art["warnings"]) == []
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        predictor = Predictor(art["path"])
        scores = predictor.score(Request([1, 2, 3], None, 4, [5, 6], features=FEATURES))
    assert predictor.model.kind == "aoti" and scores.shape == (2,)
    assert _deprecations([warning_record(w) for w in raised]) == []
    legacy = artifacts["genctr-none"]["path"].parent / "deprecated-torchscript"
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        export_run(art["meta"]["run"], legacy, fmt="torchscript")
    assert any("torch.jit" in n for n in _deprecations([warning_record(w) for w in raised]))


FEATURES = {"user_segment": 1, "user_activity": 12.0, "user_interests": [3]}


def _requests() -> list[Request]:
    """Known and unknown ids (a new ad, a user past the table, a feature value past its
    vocabulary, a category past the table), one candidate and many, empty histories."""
    rng = np.random.default_rng(7)
    out = []
    for history, candidates in ((0, 1), (1, 3), (30, 17), (60, 2)):
        items = rng.integers(0, 2000, history).tolist()
        out.append(Request(items, None, int(rng.integers(0, 20)),
                           rng.integers(0, 2000, candidates).tolist(),
                           user_id=int(rng.integers(0, 600)), features=FEATURES))  # fmt: skip
    unknown = {**FEATURES, "user_segment": 99, "user_interests": [3, 400]}
    out.append(Request([1, 2, 2500], None, 25, [4, 2001, 9999], user_id=10**6, features=unknown))
    return out


def test_exported_compiled_and_torchscript_artifacts_answer_alike(
    artifacts: dict, runs: dict[str, Path], tmp_path: Path
) -> None:
    """The same run exported three ways (AOTInductor, exported programs uncompiled, the legacy
    TorchScript) scores the same requests alike, unknown ids and side features included."""
    compiled = Predictor(artifacts["genctr-none"]["path"])
    export_run(runs["genctr"], tmp_path / "exported", compile_aoti="none")
    export_run(runs["genctr"], tmp_path / "torchscript", fmt="torchscript")
    exported, legacy = Predictor(tmp_path / "exported"), Predictor(tmp_path / "torchscript")
    assert (exported.model.kind, legacy.model.kind) == ("exported", "torchscript")
    for request in _requests():
        want = legacy.score(request)
        np.testing.assert_allclose(compiled.score(request), want, atol=1e-5)
        np.testing.assert_allclose(exported.score(request), want, atol=1e-5)
    assert compiled.unknown_ids == legacy.unknown_ids and sum(legacy.unknown_ids.values()) >= 5


def test_int4_tables_pass_the_auc_gate_or_are_refused(runs: dict[str, Path], tmp_path: Path):
    try:
        meta = export_run(runs["genctr"], tmp_path / "int4", "int4", compile_aoti="none")
    except ArtifactError as exc:
        assert "int4 tables lose" in str(exc) and not (tmp_path / "int4").exists()
        return
    parity = meta["parity"]
    assert parity["auc_change"] > -0.002
    assert parity["table_shrink"] == pytest.approx(4 * 16 / (16 / 2 + 4))  # 5.3x at dim 16


def _rewrite(art: Path, change) -> None:
    """Change ``art``'s artifact.json and write its manifest again (as an older or another
    machine's export would have it)."""
    meta = json.loads((art / "artifact.json").read_text())
    change(meta)
    (art / "artifact.json").write_text(json.dumps(meta))
    (art / "manifest.json").unlink()
    write_manifest(art)


def test_a_010_artifact_still_loads_with_one_warning(runs, tmp_path, caplog, monkeypatch) -> None:
    """genctr-rec 0.10 wrote TorchScript (format 3, no "model" entry): it loads, says how to
    rewrite it, and scores as before; with fbgemm broken it is refused in one line."""
    art = tmp_path / "old"
    export_run(runs["genctr"], art, fmt="torchscript")

    def as_010(meta: dict) -> None:
        meta["format_version"] = 3
        del meta["model"]

    _rewrite(art, as_010)
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(art)
    notes = [r.getMessage() for r in caplog.records if "TorchScript artifact" in r.getMessage()]
    assert len(notes) == 1 and "genctr export" in notes[0]
    assert predictor.model.kind == "torchscript"
    assert predictor.score(_requests()[1]).shape == (3,)
    # the one artifact kind that needs fbgemm: with it broken, the stack check's one line
    # (a serving process skips that import at start-up, so the load itself must check)
    monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)  # `import fbgemm_gpu` now fails
    with pytest.raises(StackError, match="the stack is installed but does not load"):
        Predictor(art)


def test_another_cpu_serves_the_exported_programs_or_recompiles(
    artifacts: dict, tmp_path: Path, caplog
) -> None:
    """Compiled code for another vector ISA is not run: the exported programs serve (same
    scores, a warning), ``compiled="aoti"`` refuses, and ``genctr export --recompile`` compiles
    an artifact's programs for this machine."""
    art = tmp_path / "elsewhere"
    shutil.copytree(artifacts["genctr-none"]["path"], art)
    _rewrite(art, lambda meta: meta["model"].update(vector_isa="avx512-elsewhere"))
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(art)
    assert predictor.model.kind == "exported" and "compiled for avx512-elsewhere" in caplog.text
    request = _requests()[2]
    np.testing.assert_allclose(
        predictor.score(request), Predictor(artifacts["genctr-none"]["path"]).score(request),
        atol=1e-5,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="recompile it here"):
        load_artifact(art, compiled="aoti")
    source = artifacts["ta64-none"]["path"]  # uncompiled, one entry point
    assert main(["export", "--recompile", str(source), "--out", str(tmp_path / "again")]) == 0
    again = Predictor(tmp_path / "again")
    assert again.model.kind == "aoti"
    request = Request([5, 6], [1, 2], 3, [7, 8, 9])
    np.testing.assert_allclose(again.score(request), Predictor(source).score(request), atol=1e-5)


@pytest.mark.slow
def test_a_second_model_compiles_right_beside_the_first(artifacts, tmp_path: Path) -> None:
    """Two models of the same code with other table sizes, exported one after the other with
    one Inductor cache directory (what a daily job or a test suite followed by `make pipeline`
    does): torch 2.13's AOTInductor reused a stale piece of the first compilation, and the
    second artifact's compiled g(s, c) indexed its 31-row category table as 21 rows and
    aborted the process. Each export now compiles in a private cache.

    The first model is the suite's default artifact, compiled with ``TORCHINDUCTOR_CACHE_DIR``
    set to ``inductor-cache`` beside it (``conftest.INDUCTOR``): its compilation must have left
    nothing there, and the second compiles in a fresh process with that directory set."""
    import dataclasses
    import os
    import subprocess
    import sys

    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.data.synth import SynthConfig, generate
    from genctr_rec.training.finetune import finetune
    from tests.conftest import INDUCTOR

    first = artifacts["genctr-none"]
    assert first["meta"]["model"]["compiled"] == "aoti"
    shared = first["path"].parent / INDUCTOR
    assert not shared.exists() or not any(shared.rglob("*.so")), "export used the job's cache"
    data = tmp_path / "data"
    generate(dataclasses.replace(SynthConfig.preset("toy"), num_categories=30), data)
    other = tmp_path / "run"
    cfg = RunConfig(
        "finetune",
        str(data),
        ModelConfig(),  # the first's features, other vocabularies
        TrainConfig(epochs=1, batch_size=256, calibrate="none"),
        backbone="dnn",
        transfer="decoder",  # g(s, c) from scratch: the contexts program is compiled
    )
    finetune(cfg, other)
    out = tmp_path / "second"
    done = subprocess.run(
        [sys.executable, "-m", "genctr_rec.cli", "export", "--run", str(other), "--out", out],
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(shared)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((out / "artifact.json").read_text())
    assert meta["model"]["compiled"] == "aoti"
    assert meta["parity"]["max_abs_diff"] <= 1e-5
