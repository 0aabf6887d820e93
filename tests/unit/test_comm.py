"""model/comm.py: no-ops without a process group, the device each backend is given, and every helper over two
gloo processes (the NCCL side of the device choice is exercised on a GPU by tests/gpu)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import comm

pytestmark = pytest.mark.timeout(120)


def test_no_process_group_means_no_ops() -> None:
    assert not dist.is_initialized()
    t = torch.tensor([3.0])
    assert comm.all_reduce(t) is t and t.item() == 3.0
    assert comm.any_rank(True) and not comm.any_rank(False)
    assert comm.all_reduce_values([1, 2.5]) == [1.0, 2.5]
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.all_gather_object(7) == [7] and comm.gather_object(7) == [7]
    assert comm.all_gather(t) == [t]
    comm.barrier()
    assert (comm.world_size(), comm.rank(), comm.is_multi()) == (1, 0, False)


@pytest.mark.parametrize(("backend", "cpu_ok"), [("gloo", True), ("nccl", False), ("cuda:nccl,cpu:gloo", True),
                                                 ("cuda:nccl", False), ("mpi", True)])
def test_which_backends_take_cpu_tensors(monkeypatch: pytest.MonkeyPatch, backend: str, cpu_ok: bool) -> None:
    """A host flag on NCCL must go to the GPU (the pre-emption check's CPU tensor did not: issue 15)."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert comm.accepts_cpu() is cpu_ok
    if cpu_ok:
        assert comm.collective_device(torch.zeros(1)) == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        t = torch.tensor([float(rank + 1)])
        maxed = comm.all_reduce(torch.tensor([rank]), op="max")
        out[rank] = {
            "sum": comm.all_reduce(t).item(),
            "max": maxed.item(),
            "values": comm.all_reduce_values([rank, 10.0]),
            "any_rank": comm.any_rank(rank == 1),
            "none": comm.any_rank(False),
            "broadcast": comm.broadcast_object("from0" if rank == 0 else "from1"),
            "all_gather_object": comm.all_gather_object(rank * 10),
            "gather_object": comm.gather_object(rank + 100),
            "all_gather": [p.tolist() for p in comm.all_gather(torch.tensor([rank, -rank]))],
        }
        comm.barrier()
    finally:
        dist.destroy_process_group()


def test_helpers_over_two_gloo_processes() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        r = results[rank]
        assert r["sum"] == 3.0 and r["max"] == 1 and r["values"] == [1.0, 20.0]
        assert r["any_rank"] is True and r["none"] is False
        assert r["broadcast"] == "from0" and r["all_gather_object"] == [0, 10]
        assert r["all_gather"] == [[0, 0], [1, -1]]
    assert results[0]["gather_object"] == [100, 101] and results[1]["gather_object"] is None
