"""``genctr pipeline``: every stage on the default data, end to end, resumable by stage.

Each stage writes its output atomically and is skipped when that output already exists, so a
second run (or a run after a crash) picks up where the last one stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from genctr_rec.data.schema import META_FILE
from genctr_rec.data.synth import SynthConfig, generate
from genctr_rec.data.validate import validate_dataset

logger = logging.getLogger(__name__)


def prepare_data(workdir: Path, preset: str) -> Path:
    data = workdir / f"data-{preset}"
    if (data / META_FILE).is_file():
        logger.info("reusing dataset %s", data)
    else:
        logger.info("simulating the %s dataset into %s", preset, data)
        generate(SynthConfig.preset(preset), data)
    report = validate_dataset(data)
    logger.info(
        "dataset valid: %s",
        json.dumps({k: report[k]["rows"] for k in ("train", "test", "sequences")}),
    )
    return data


def run_pipeline(workdir: str | Path, preset: str = "default", seed: int = 0) -> dict:
    workdir = Path(workdir)
    data = prepare_data(workdir, preset)
    summary = {"data": str(data), "seed": seed}
    print(json.dumps(summary))
    return summary
