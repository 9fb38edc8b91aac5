"""dfa_core.parallel: shard bounds, stage plans and the checks shared by both backends' engines."""

import pytest

from dfa_core import parallel


@pytest.mark.parametrize("n,size", [(8, 4), (10, 4), (3, 4), (0, 2), (7, 1)])
def test_shards_tile_the_batch_in_order_and_balance(n, size):
    bounds = [parallel.shard_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_stage_plan_is_contiguous_and_covers_every_block():
    assert parallel.stage_plan(5, 2) == ((0, 1, 2), (3, 4))
    assert parallel.stage_plan(3, 3) == ((0,), (1,), (2,))
    with pytest.raises(ValueError, match="2 block.*3 stages"):
        parallel.stage_plan(2, 3)


def test_data_parallel_checks_name_what_was_wrong():
    assert parallel.check_data_parallel(4, 200) == 4
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by devices=4"):
        parallel.check_data_parallel(4, 10)
    with pytest.raises(ValueError, match="devices=8 asked for, but only 2"):
        parallel.check_data_parallel(8, 16, available=2)
    with pytest.raises(ValueError, match="devices"):
        parallel.check_data_parallel(0, 16)


def test_world_size_of_a_torchrun_launch():
    assert parallel.launched_world_size({}) == 1
    assert parallel.launched_world_size({"WORLD_SIZE": "4"}) == 4
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="WORLD_SIZE must be a positive integer"):
            parallel.launched_world_size({"WORLD_SIZE": bad})


def test_rank_of_a_torchrun_launch():
    assert parallel.launched_rank({}) == 0
    assert parallel.launched_rank({"WORLD_SIZE": "2", "RANK": "1"}) == 1
    with pytest.raises(ValueError, match="RANK must be a non-negative integer"):
        parallel.launched_rank({"WORLD_SIZE": "2"})
