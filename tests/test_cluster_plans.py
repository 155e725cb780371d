"""Plans for CUDA clusters built on this CPU: they fit, and use the layouts expected."""

from __future__ import annotations

import pytest

from genctr_rec.training.cluster_plans import genctr_config, plan_for_cluster

SHARDED = {"row_wise", "table_row_wise", "column_wise", "table_column_wise"}


def test_a_billion_item_table_is_split_over_gpus_and_fits() -> None:
    plan = plan_for_cluster(genctr_config(1_000_000_000, 100_000_000), nodes=1)
    assert plan.gpus == 8 and plan.fits()
    item = plan.tables["item"]
    assert item["rows"] == 1_000_000_000 and item["kernel"] == "fused"
    assert item["sharding"] in SHARDED and len(item["gpus"]) == 8
    # 1B x 16 floats and Adam's two moments: 192 GB, spread under 80 GB a GPU
    assert 192 / 8 <= plan.hbm_gb_per_gpu_max <= 80
    assert plan.tables["user_id"]["rows"] == 100_000_001  # users + the shared default row


@pytest.mark.parametrize("nodes", [1, 4])
def test_every_scale_fits_and_small_tables_stay_whole(nodes: int) -> None:
    small = plan_for_cluster(genctr_config(1_000_000, 1_000_000), nodes=nodes)
    assert small.fits() and small.gpus == 8 * nodes
    assert small.est_step_ms > 0
    for items, users in ((100_000_000, 10_000_000), (1_000_000_000, 100_000_000)):
        assert plan_for_cluster(genctr_config(items, users), nodes=nodes).fits()
    if nodes == 1:  # one node: a 1M table is not worth splitting
        assert small.tables["item"]["sharding"] == "table_wise"


def test_replicating_a_billion_item_table_is_refused() -> None:
    """What DDP over nn.Embedding would need: 192 GB a GPU. The planner finds no plan."""
    with pytest.raises(Exception, match="(?i)plan|fit|storage|memory"):
        plan_for_cluster(
            genctr_config(1_000_000_000, 1000), nodes=1, forced={"item": "data_parallel"}
        )
