"""Worker of ``test_gloo_cuda.py``: two processes on ONE GPU over gloo, every collective with CUDA tensors.

    torchrun --standalone --nproc-per-node 2 tests/gpu/run_gloo_cuda.py OUT_JSON [cuda|cpu]

NCCL refuses two ranks on one device, so a one-GPU machine checks the multi-rank code paths over gloo instead:
(1) every function of ``model.comm`` with CUDA tensors (and the CPU host values the loop reduces), against the
values they must give; (2) a tensor-parallel (TP2) forward and backward of the Llama on the GPU, megatron-core
layers over the gloo group, against the same model in one piece on rank 0: loss, this rank's vocabulary slice
of the logits, and the gradient slice of every sharded weight. Writes what it measured to ``OUT_JSON`` (rank 0);
any mismatch raises (exit status 1). ``cpu`` as the second argument runs the same on CPU tensors (the test's
dry run without a GPU).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from model import comm  # noqa: E402
from model.config import get_config  # noqa: E402
from model.llama import Llama, init_llama_weights  # noqa: E402
from model.parallel import MegatronLayers, gather_vocab_logits, token_cross_entropy  # noqa: E402


def check_comm(device: torch.device) -> dict[str, bool]:
    """Each ``model.comm`` function on ``device`` tensors gives the value it must, on both ranks."""
    rank, world = comm.rank(), comm.world_size()
    results = {}
    t = torch.full((3,), float(rank + 1), device=device)
    results["all_reduce_sum"] = comm.all_reduce(t).tolist() == [3.0] * 3 and t.device == device
    t = torch.tensor([float(rank)], device=device)
    results["all_reduce_max"] = comm.all_reduce(t, op="max").item() == 1.0
    results["all_reduce_values"] = comm.all_reduce_values([1.5, rank]) == [3.0, 1.0]
    results["any_rank"] = comm.any_rank(rank == 1) is True and comm.any_rank(False) is False
    parts = comm.all_gather(torch.arange(4, device=device) + 10 * rank)
    results["all_gather"] = [p.tolist() for p in parts] == [[0, 1, 2, 3], [10, 11, 12, 13]] and all(
        p.device == device for p in parts)
    results["broadcast_object"] = comm.broadcast_object({"rank": rank}) == {"rank": 0}
    results["all_gather_object"] = comm.all_gather_object(rank) == list(range(world))
    comm.barrier()
    return results


def check_tensor_parallel(device: torch.device) -> dict[str, float]:
    """TP2 forward + backward on ``device`` vs the unsharded model; the largest gaps (relative to the max)."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = get_config("debug_llama3_tiny")
    tp_rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    sharded = Llama(cfg, layers=MegatronLayers())
    init_llama_weights(sharded, seed=0)
    sharded.to(device)
    full = Llama(cfg)
    init_llama_weights(full, seed=0)
    full.to(device)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    labels = tokens.roll(-1, 1)
    logits = sharded(tokens)
    kept = logits.detach().clone()  # megatron's vocab_parallel_cross_entropy shifts its input in place
    loss = token_cross_entropy(logits, labels, tp_size=2).mean()
    loss.backward()
    ref_logits = full(tokens)
    ref_loss = token_cross_entropy(ref_logits, labels, tp_size=1).mean()
    ref_loss.backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    width = cfg.vocab_size // 2
    gaps = {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "logits_slice": rel(kept, ref_logits.detach()[..., tp_rank * width:(tp_rank + 1) * width]),
            "logits_gathered": rel(gather_vocab_logits(kept, group=group, tp_size=2),
                                   ref_logits.detach())}
    reference = dict(full.named_parameters())
    grad_gap = 0.0
    for name, param in sharded.named_parameters():
        expected = reference[name].grad
        dim = getattr(param, "tp_dim", None)
        if dim is not None:
            size = expected.shape[dim] // 2
            expected = expected.narrow(dim, tp_rank * size, size)
        grad_gap = max(grad_gap, rel(param.grad, expected))
    gaps["gradients"] = grad_gap
    return gaps


def main() -> None:
    out, kind = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cuda"
    device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(0)  # both ranks share the one GPU
    dist.init_process_group("gloo")
    results = {"comm": check_comm(device), "tensor_parallel": check_tensor_parallel(device),
               "device": str(device), "world_size": comm.world_size()}
    failed = [k for k, ok in results["comm"].items() if not ok]
    failed += [k for k, gap in results["tensor_parallel"].items() if not gap <= 1e-5]
    if int(os.environ["RANK"]) == 0:
        out.write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()
    if failed:
        raise SystemExit(f"rank {os.environ['RANK']}: failed {failed}: {results}")


if __name__ == "__main__":
    main()
