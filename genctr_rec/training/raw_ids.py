"""A training run over a dataset of raw ids (``data/id_maps.py``): its maps and dense view.

Every rank builds the same maps from the same files (deterministic, no collective), so the
table sizes are known before the run directory is opened and its ``config.json`` compared for
a resume; rank 0 then writes the maps and the dense view into the run, the others wait.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from genctr_rec.config import ConfigError, RunConfig, absolute_location
from genctr_rec.data.id_maps import (
    DENSE_DIR,
    ID_MAPS_DIR,
    IdMaps,
    build_maps,
    dense_meta,
    write_dense_view,
)
from genctr_rec.data.schema import META_FILE, DatasetMeta
from genctr_rec.distributed import DistContext
from genctr_rec.storage import Location, location

logger = logging.getLogger(__name__)


def previous_maps(cfg: RunConfig, meta: DatasetMeta) -> tuple[IdMaps | None, str | None]:
    """The maps (and dense view) of the run this one continues: ``--warm-start``, else
    ``--init-from``; refused when that run read its ids another way."""
    previous = cfg.warm_start or cfg.init_from
    if previous is None:
        return None, None
    prev = RunConfig.load(previous)
    if sorted(prev.raw_ids) != sorted(meta.raw_ids):
        raise ConfigError(
            f"{cfg.data} declares raw_ids {sorted(meta.raw_ids)}, {previous} was trained with "
            f"{sorted(prev.raw_ids) or 'dense ids'}: the rows of one would not be the ids of "
            "the other"
        )
    if not prev.raw_ids:
        return None, None
    return IdMaps.read(location(previous) / ID_MAPS_DIR), prev.dense_data


def plan_raw_ids(
    cfg: RunConfig, meta: DatasetMeta, out: Location
) -> tuple[IdMaps | None, DatasetMeta]:
    """For a dataset that declares raw ids: the maps (continuing the previous run's) and the
    dense view's meta; ``cfg`` then reads the view (``RUN/dense-data``). A dense dataset:
    (None, ``meta``), once the run it continues is known to be dense too."""
    before, _ = previous_maps(cfg, meta)
    if not meta.raw_ids:
        return None, meta
    maps = build_maps(cfg.data, meta, before)
    cfg.raw_ids = list(meta.raw_ids)
    cfg.dense_data = absolute_location(location(out) / DENSE_DIR)
    logger.info(
        "raw ids: %s",
        ", ".join(f"{space} {n:,} rows" for space, n in maps.sizes().items()),
    )
    return maps, dense_meta(meta, maps, cfg.data)


def write_view(
    cfg: RunConfig, meta: DatasetMeta, maps: IdMaps, out: Location, ctx: DistContext
) -> None:
    """Collective: rank 0 writes ``RUN/id_maps`` and ``RUN/dense-data`` (unless a resumed run
    has them already), every rank waits for them."""
    if ctx.is_main:
        view = location(out) / DENSE_DIR
        stored = location(out) / ID_MAPS_DIR
        if not (view / META_FILE).is_file() or IdMaps.read(stored).sizes() != maps.sizes():
            _, previous_view = previous_maps(cfg, meta)
            write_dense_view(cfg.data, meta, maps, view, previous_view)
            maps.write(stored)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
