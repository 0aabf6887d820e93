"""Saved-activation bytes per rank under context parallelism (issue 22): measured vs ``launch.planner``.

    python benchmarks/bench_cp_activations.py [--seq 8192] [--models debug_llama3_tiny,bench_25m]

Launches itself under ``torchrun`` with 4 processes (gloo): CP 1 (each rank alone), CP 2 (two groups of two)
and CP 4. On each rank one bf16 transformer block runs forward on the rank's ``seq / cp`` tokens with the
context-parallel attention kernel (K/V all-gathered over the CP group), the GPU path's separate projections,
and ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps for backward (by storage,
minus the parameters, the block input, the RoPE tables and the per-forward mask that all blocks share). The
planner's ``activation_bytes_per_token(cfg, Layout(cp=cp, fused_norm=False), seq)`` x ``seq / cp`` is printed
beside it. Writes ``benchmarks/results/bench_cp_activations.json``.

Sequence parallelism is not measured: ``train/`` does not implement it (issue 22 item 1 is open).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def saved_block_bytes(model_name: str, cp_group, seq: int, *, layers=None, sp: int = 1) -> dict[str, float]:  # noqa: ANN001
    """Bytes one bf16 block of this rank keeps for backward, and its token count, at CP = ``cp_group``'s size;
    ``layers``: a ``LayerFactory`` (``model.parallel.MegatronLayers`` for tensor parallelism; default plain);
    ``sp``: the TP size when ``layers`` are sequence-parallel (the block input is then this rank's slice)."""
    from model import projections
    from model.attention import AttentionMask
    from model.config import get_config
    from model.context_parallel import ContextParallel
    from model.llama import Llama, init_llama_weights

    cp = ContextParallel(cp_group)
    cfg = get_config(model_name)
    model = Llama(cfg.replace(n_layers=1), layers=layers)
    init_llama_weights(model, seed=0)
    model = model.to(torch.bfloat16)
    model.layers[0].attention.kernel = cp.kernel  # at CP 1 too: the same kernel, a gather of one
    local = seq // cp.size
    x = torch.randn(1, local // sp, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = model.rotary(cp.positions(seq))
    mask = AttentionMask(document_ids=cp.shard(torch.zeros(1, seq, dtype=torch.long)))
    queries = torch.empty(1, local, 1, 1, dtype=torch.bfloat16)
    mask.memo("context_parallel", lambda: cp.kernel.additive_mask(mask, queries))
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared |= {t.untyped_storage().data_ptr() for t in (x, *rope, *mask._forms.values())}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    choose = projections.choose_path
    projections.choose_path = lambda *args: "separate"  # the GPU path's projections (no concatenated weight)
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.layers[0](x, rope, mask=mask)
    finally:
        projections.choose_path = choose
    return {"bytes": float(sum(saved.values())), "tokens": float(local)}


def cp_groups() -> dict[int, object]:
    """CP 1 (None), CP 2 ({0,1} / {2,3}) and CP 4 (all four ranks); every rank creates every group."""
    import torch.distributed as dist

    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return {1: None, 2: pairs[rank // 2], 4: dist.new_group([0, 1, 2, 3])}


def worker(out: Path, models: list[str], seq: int) -> None:
    import torch.distributed as dist

    from launch.planner import Layout, activation_bytes_per_token
    from model import comm
    from model.config import get_config

    dist.init_process_group("gloo")
    groups = cp_groups()
    rows = []
    for name in models:
        for cp, group in groups.items():
            measured = saved_block_bytes(name, group, seq)
            planned = activation_bytes_per_token(get_config(name), Layout(cp=cp, fused_norm=False), seq)
            rows.append({"model": name, "cp": cp, "seq": seq, "tokens_per_rank": measured["tokens"],
                         "saved_bytes_per_rank": measured["bytes"],
                         "planned_bytes_per_rank": planned * measured["tokens"]})
    if dist.get_rank() == 0:
        for row in rows:
            base = next(r for r in rows if r["model"] == row["model"] and r["cp"] == 1)
            row["ratio_vs_cp1"] = row["saved_bytes_per_rank"] / base["saved_bytes_per_rank"]
        result = {"date": "2026-12-05", "load_average": os.getloadavg(), "torch": torch.__version__,
                  "what": "bytes one bf16 block keeps for backward per rank (saved_tensors_hooks)", "rows": rows}
        out.write_text(json.dumps(result, indent=2) + "\n")
        for row in rows:
            print(f"{row['model']:<18} CP {row['cp']}: {row['saved_bytes_per_rank'] / 2**20:8.2f} MiB per rank "
                  f"(planner {row['planned_bytes_per_rank'] / 2**20:8.2f}), x{row['ratio_vs_cp1']:.3f} of CP 1")
    comm.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--models", default="debug_llama3_tiny,bench_25m")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_cp_activations.json")
    args = parser.parse_args()
    models = args.models.split(",")
    if "RANK" in os.environ:
        worker(args.out, models, args.seq)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", __file__,
           f"--seq={args.seq}", f"--models={args.models}", f"--out={args.out}"]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


if __name__ == "__main__":
    raise SystemExit(main())
