"""``--compile``: the compiled dense step trains exactly as the eager one (same losses and
parameters), really runs compiled for full training batches, leaves partial batches and
evaluation eager, keeps the state-dict keys, and is wired to ``genctr finetune --compile``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from genctr_rec.cli import main
from genctr_rec.data.keys import (
    HIST_CATEGORIES,
    HIST_ITEMS,
    QUERY_CATEGORY,
    TARGET_CATEGORY,
    TARGET_ITEM,
)
from genctr_rec.embeddings import SharedEmbeddings
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.training.compiled import compile_dense_step

ITEMS, CATEGORIES, DIM, CAP = 200, 12, 16, 20


def _batch(size: int, generator: torch.Generator) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    lengths = torch.randint(0, CAP + 1, (size,), generator=generator)
    n = int(lengths.sum())
    ones = torch.ones(size, dtype=torch.int32)
    values = [
        torch.randint(0, ITEMS, (size,), generator=generator),
        torch.randint(0, CATEGORIES, (2 * size,), generator=generator),
        torch.randint(0, ITEMS, (n,), generator=generator),
        torch.randint(0, CATEGORIES, (n,), generator=generator),
    ]
    features = KeyedJaggedTensor(
        keys=[TARGET_ITEM, TARGET_CATEGORY, QUERY_CATEGORY, HIST_ITEMS, HIST_CATEGORIES],
        values=torch.cat(values),
        lengths=torch.cat([ones, ones, ones, lengths.int(), lengths.int()]),
    )
    return features, torch.randint(0, 2, (size,), generator=generator).float()


def _train(model: CTRModel, batches: list) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for features, labels in batches:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(features), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_step_trains_as_the_eager_one() -> None:
    torch.manual_seed(0)
    embeddings = SharedEmbeddings(ITEMS, CATEGORIES, DIM, dedup=False, device=torch.device("cpu"))
    eager = CTRModel(embeddings, "dcnv2_ta", GenerativeDecoder(DIM, CAP + 1))
    compiled = copy.deepcopy(eager)
    keys = list(eager.state_dict())
    forwards = compile_dense_step(compiled, CAP)
    generator = torch.Generator().manual_seed(1)
    # three full batches, one of another size (an epoch's last), then full again
    batches = [_batch(size, generator) for size in (64, 64, 64, 37, 64)]

    eager_losses, compiled_losses = _train(eager, batches), _train(compiled, batches)

    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    compiled_state = compiled.state_dict()
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == keys  # checkpoints load either way
    assert [f.failed for f in forwards] == [False, False]
    assert [f.compiled_calls for f in forwards] == [4, 4]  # the 37-row batch ran eagerly
    compiled.eval()
    with torch.no_grad():
        features, _ = batches[0]
        torch.testing.assert_close(compiled(features), eager.eval()(features))
    assert [f.compiled_calls for f in forwards] == [4, 4]  # evaluation ran eagerly


@pytest.mark.slow
def test_finetune_compile_flag_trains_the_same_run(
    toy_synth: Path, toy_pretrained: Path, tmp_path: Path, monkeypatch
) -> None:
    import genctr_rec.training.finetune as finetune

    made = []
    monkeypatch.setattr(
        finetune,
        "compile_dense_step",
        lambda *args: made.extend(compile_dense_step(*args)) or made,
    )
    common = ["--data", str(toy_synth), "--backbone", "dcnv2_ta", "--transfer", "ps_mi"]
    common += ["--init-from", str(toy_pretrained), "--steps", "6", "--batch-size", "64"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        assert main(["finetune", *common, "--out", str(out), *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
        saved = json.loads((out / "config.json").read_text())
        assert saved["train"]["compile"] is (name == "compiled")
    assert len(made) == 2 and all(f.compiled_calls > 0 and not f.failed for f in made)
    assert runs["compiled"]["epoch_loss"] == pytest.approx(runs["eager"]["epoch_loss"], rel=1e-4)
    assert runs["compiled"]["test"]["auc"] == pytest.approx(runs["eager"]["test"]["auc"], abs=1e-4)


def test_a_run_written_before_a_setting_existed_still_resumes(tmp_path: Path) -> None:
    """config.json of 0.9 has no ``train.compile``: the missing setting takes its default
    instead of refusing the resume as a changed configuration."""
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.rundir import write_or_check_config

    cfg = RunConfig("finetune", str(tmp_path / "data"), ModelConfig(), TrainConfig(epochs=1))
    write_or_check_config(cfg, tmp_path)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["train"]["compile"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoints").mkdir()  # there is a run to resume
    write_or_check_config(cfg, tmp_path)  # no error
    cfg.train.compile = True  # a real change is still refused
    with pytest.raises(Exception, match="different configuration"):
        write_or_check_config(cfg, tmp_path)


def test_a_failed_compile_falls_back_to_eager(monkeypatch, caplog) -> None:
    """Inductor on CPU needs a C++ compiler: where compiling raises, the step runs eagerly
    (same outputs) and says so once."""
    import genctr_rec.training.compiled as compiled_module

    def broken_compile(fn, **_):
        def run(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    torch.manual_seed(0)
    embeddings = SharedEmbeddings(ITEMS, CATEGORIES, DIM, dedup=False, device=torch.device("cpu"))
    model = CTRModel(embeddings, "dnn", GenerativeDecoder(DIM, CAP + 1))
    reference = copy.deepcopy(model)
    forwards = compile_dense_step(model, CAP)
    batches = [_batch(32, torch.Generator().manual_seed(2)) for _ in range(2)]
    with caplog.at_level("WARNING", logger="genctr_rec.training.compiled"):
        assert _train(model, batches) == pytest.approx(_train(reference, batches), rel=1e-6)
    assert all(f.failed and f.compiled_calls == 0 for f in forwards)
    warnings = [r for r in caplog.records if "running it eagerly" in r.getMessage()]
    assert len(warnings) == 2  # once per compiled part, not once per step
