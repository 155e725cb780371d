from __future__ import annotations

from pathlib import Path

import pytest

from genctr_rec.data.synth import SynthConfig, generate
from tests.helpers import write_dataset


@pytest.fixture()
def small_dataset(tmp_path: Path) -> Path:
    """A hand-built valid dataset (fresh per test, so tests may break it)."""
    return write_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def toy_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulator's toy preset, generated once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("synth") / "toy"
    generate(SynthConfig.preset("toy"), out)
    return out
