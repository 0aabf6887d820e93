"""Worker of tests/distributed/test_context_parallel.py: context-parallel forward/backward vs the dense model.

    torchrun --standalone --nproc-per-node=4 tests/distributed/run_context_parallel.py OUT_DIR

One launch of 4 processes checks CP 2 (groups {0,1} and {2,3}) and CP 4 (all ranks). Every rank builds the same
seeded model (``debug_llama3_tiny``: grouped-query attention and Llama 3.1 RoPE scaling with an original
context of 64, so global positions past it matter), computes the single-process reference on the whole batch,
then the context-parallel run on its two chunks with the loss normalised by the global token count and the
gradients summed over its CP group. Rank 0 writes ``OUT_DIR/context_parallel.json`` with the largest
differences (logits of the local tokens, loss, every gradient) per CP size, for both the fused CPU kernels
and the eager formulas; plus the bytes one block saves for backward per rank (bf16, eager) at each CP size
(``benchmarks/bench_cp_activations.saved_block_bytes``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: benchmarks/ is not installed

from benchmarks.bench_cp_activations import cp_groups, saved_block_bytes  # noqa: E402
from model import comm, kernels  # noqa: E402
from model.config import get_config  # noqa: E402
from model.context_parallel import ContextParallel  # noqa: E402
from model.llama import Llama, init_llama_weights  # noqa: E402

SEQ, BATCH = 96, 2
# Document lengths per row: boundaries fall inside chunks (chunk = 24 tokens at CP 2, 12 at CP 4).
DOCUMENTS = [[5, 19, 30, 10, 32], [40, 3, 3, 50]]


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, 512, (BATCH, SEQ), generator=gen)
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in DOCUMENTS])
    return tokens, labels, docs


def loss_sum(model: Llama, tokens, labels, docs, positions=None) -> torch.Tensor:
    logits = model(tokens, positions=positions, document_ids=docs)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"), logits


def compare(cp: ContextParallel) -> dict[str, float]:
    cfg = get_config("debug_llama3_tiny")
    reference = Llama(cfg)
    init_llama_weights(reference, seed=11)
    model = copy.deepcopy(reference)
    tokens, labels, docs = batch()
    total = BATCH * SEQ
    ref_loss, ref_logits = loss_sum(reference, tokens, labels, docs)
    (ref_loss / total).backward()
    cp.pin(model)
    local_loss, logits = loss_sum(model, cp.shard(tokens), cp.shard(labels), cp.shard(docs),
                                  positions=cp.positions(SEQ))
    (local_loss / total).backward()
    loss = comm.all_reduce_values([local_loss.item()], group=cp.group)[0]
    grads = {}
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        grads[name] = (comm.all_reduce(p.grad.clone(), group=cp.group) - ref.grad).abs().max().item()
    return {"logits": (logits - cp.shard(ref_logits)).abs().max().item(),
            "loss": abs(loss - ref_loss.item()) / total, "grad": max(grads.values()),
            "grad_param": max(grads, key=grads.get)}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = cp_groups()
    results: dict[str, object] = {}
    for size in (2, 4):
        cp = ContextParallel(groups[size])
        results[f"cp{size}_fused"] = compare(cp)
        with kernels.disabled():
            results[f"cp{size}_eager"] = compare(cp)
    for size in (1, 2, 4):  # the measurement of benchmarks/bench_cp_activations.py
        results[f"saved_cp{size}"] = saved_block_bytes("debug_llama3_tiny", groups[size], 8192)
    # Tensor parallelism 2 (megatron-core layers), without and with CP 2: what one TP rank keeps.
    from megatron.core import parallel_state

    from model.parallel import MegatronLayers

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    tp_layers = MegatronLayers(params_dtype=torch.bfloat16)
    results["saved_tp2"] = saved_block_bytes("debug_llama3_tiny", None, 2048, layers=tp_layers)
    results["saved_tp2_cp2"] = saved_block_bytes("debug_llama3_tiny", parallel_state.get_context_parallel_group(),
                                                 2048, layers=tp_layers)
    from model.sequence_parallel import SequenceParallelLayers

    results["saved_tp2_sp"] = saved_block_bytes("debug_llama3_tiny", None, 2048,
                                                layers=SequenceParallelLayers(params_dtype=torch.bfloat16), sp=2)
    parallel_state.destroy_model_parallel()
    gathered = comm.all_gather_object(results)
    if rank == 0:
        (out / "context_parallel.json").write_text(json.dumps(gathered, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
