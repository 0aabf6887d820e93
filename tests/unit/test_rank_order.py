"""Rank order [TP, CP, PP, DP] (Llama 3's, innermost first) in ``train/topology.py``: rank -> coordinates, and
megatron-core's and DeepSpeed's pipeline groups built from it agree with each other (no processes needed:
both libraries' grid builders are pure functions of the sizes)."""

from __future__ import annotations

import itertools

import pytest
from megatron.core.parallel_state import RankGenerator

from train.topology import MEGATRON_ORDER, grid_coordinates, pipeline_grid

SIZES = {"tp": 2, "cp": 2, "pp": 2, "dp": 2}


def test_rank_to_coordinates() -> None:
    at = lambda r: grid_coordinates(r, **SIZES)  # noqa: E731
    assert at(0) == {"tp": 0, "cp": 0, "pp": 0, "dp": 0}
    assert at(1) == {"tp": 1, "cp": 0, "pp": 0, "dp": 0}  # TP innermost
    assert at(2) == {"tp": 0, "cp": 1, "pp": 0, "dp": 0}  # then CP
    assert at(4) == {"tp": 0, "cp": 0, "pp": 1, "dp": 0}  # then PP
    assert at(8) == {"tp": 0, "cp": 0, "pp": 0, "dp": 1}  # DP outermost
    assert at(13) == {"tp": 1, "cp": 0, "pp": 1, "dp": 1}
    # Llama 3's 128K layout: TP 8 x CP 16 inside 16 nodes; the second pipeline stage starts at rank 128.
    llama = {"tp": 8, "cp": 16, "pp": 16, "dp": 8}
    assert grid_coordinates(128, **llama) == {"tp": 0, "cp": 0, "pp": 1, "dp": 0}
    assert grid_coordinates(16383, **llama) == {"tp": 7, "cp": 15, "pp": 15, "dp": 7}
    with pytest.raises(ValueError, match="outside a world"):
        grid_coordinates(16, **SIZES)


def _groups(varying: tuple[str, ...], sizes: dict[str, int]) -> list[list[int]]:
    """Ranks that differ only in the ``varying`` dimensions, by ``grid_coordinates``."""
    world = sizes["tp"] * sizes["cp"] * sizes["pp"] * sizes["dp"]
    key = lambda r: tuple(v for k, v in grid_coordinates(r, **sizes).items() if k not in varying)  # noqa: E731
    groups: dict[tuple, list[int]] = {}
    for rank in range(world):
        groups.setdefault(key(rank), []).append(rank)
    return sorted(groups.values())


@pytest.mark.parametrize("tp,cp,pp,dp", [(2, 2, 2, 2), (2, 1, 2, 2), (1, 2, 4, 2), (4, 2, 1, 2)])
def test_megatron_and_deepspeed_groups_follow_the_grid(tp: int, cp: int, pp: int, dp: int) -> None:
    sizes = {"tp": tp, "cp": cp, "pp": pp, "dp": dp}
    megatron = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=MEGATRON_ORDER)
    for token, varying in (("tp", ("tp",)), ("cp", ("cp",)), ("pp", ("pp",)), ("dp", ("dp",)),
                           ("cp-dp", ("cp", "dp"))):
        assert sorted(megatron.get_ranks(token)) == _groups(varying, sizes), token
    # megatron-core's expert grid (no experts: TP spans TP x CP, see Topology.initialize) must give the same PP
    # groups, or initialize_model_parallel refuses the order.
    expert = RankGenerator(tp=tp * cp, ep=1, dp=dp, pp=pp, cp=1, order=MEGATRON_ORDER)
    assert expert.get_ranks("pp") == megatron.get_ranks("pp")
    grid = pipeline_grid(**sizes)
    assert sorted(grid.get_axis_comm_lists("pipe")) == _groups(("pp",), sizes)
    assert sorted(grid.get_axis_comm_lists("model")) == _groups(("tp",), sizes)
    assert sorted(grid.get_axis_comm_lists("data")) == _groups(("cp", "dp"), sizes)
    for rank in range(tp * cp * pp * dp):
        c, at = grid.get_coord(rank), grid_coordinates(rank, **sizes)
        assert (c.pipe, c.model, c.data) == (at["pp"], at["tp"], at["dp"] * cp + at["cp"])  # data = dp_cp_rank
    assert sorted(grid.mapping.values()) == list(range(tp * cp * pp * dp))
    assert list(itertools.islice(grid.get_axis_list("pipe", 0), 3)) == [r for r in range(tp * cp * pp * dp)
                                                                     if grid_coordinates(r, **sizes)["pp"] == 0][:3]
