"""Worker for the PPO parity test: one PPO iteration per layout, everything it computed written to JSON.

    python tests/distributed/run_ppo_layouts.py OUT_DIR single=                          # the reference
    torchrun --standalone --nproc-per-node 2 tests/distributed/run_ppo_layouts.py OUT_DIR \\
        tp2=--parallel.tp=2 dp2_zero3_once=--zero.stage=3,--rollout.gather=once ...

Each ``NAME=--a.b=1,--c.d=2`` builds a ``PPOTrainer`` on the tiny parity config with those overrides, runs two
iterations (rollout, scoring, rewards, GAE, one policy and one value step per minibatch; in the second the
policy differs from the reference, so the KL penalty is active) and writes ``OUT_DIR/NAME/result.json``: each
iteration's metrics and, per global prompt index of the last one, the sampled answer, the sequence reward,
and the log-probs / values / advantages; plus the consolidated policy and value weights.
Process groups are rebuilt between layouts whose TP size differs (``Topology.initialize``). ``@eager`` among
the overrides runs that layout inside ``model.kernels.disabled()`` (the eager formulas, as on a GPU).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from model import kernels  # noqa: E402
from rlhf.ppo import rollout as ro  # noqa: E402
from rlhf.ppo.config import PPOConfig  # noqa: E402
from rlhf.ppo.trainer import PPOTrainer  # noqa: E402

BASE = [
    "--model.name=debug_tiny", "--reward.helpful=target_tokens:40,41,42,43,44,45,46,47",
    "--reward.safety=avoid_tokens:60,61", "--reward.beta=0.05", "--prompts.synthetic_count=48",
    "--prompts.synthetic_safety_fraction=0.25", "--prompts.heldout=8", "--prompts.max_tokens=16",
    "--rollout.max_new_tokens=8", "--rollout.batch_size=8", "--ppo.iterations=1", "--ppo.prompts_per_iteration=16",
    "--train.global_batch_size=8", "--train.micro_batch_size=4", "--optim.lr=3e-3", "--ppo.value_lr=3e-3",
    "--optim.grad_clip=0.5", "--eval.every=0", "--train.seed=11",
]
ITERATIONS = 2
EAGER = "@eager"


BUILD_COPY = ro._generation_copy  # the real one (each layout's watcher wraps it, not the previous watcher)


class _Allocations(TorchDispatchMode):
    """The largest fp32 tensor any op allocates while the rollout copy is built (a fp32 materialisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.largest_fp32 = max(self.largest_fp32, t.numel())
        return out


def _watch_rollout_copy(trainer: PPOTrainer) -> dict:
    """Record, for every rollout copy the policy builds: its dtypes and size, the largest gather it needed and
    the largest fp32 tensor allocated meanwhile (``rollout_copy`` in result.json)."""
    seen: dict = {"dtypes": set(), "copy_numel": 0, "largest_gather": 0, "largest_fp32": 0, "copies": 0}
    engine, build, gathered = trainer.policy, BUILD_COPY, trainer.policy.gathered_parameters

    def counting_gather(params=None):  # noqa: ANN001, ANN202
        seen["largest_gather"] = max(seen["largest_gather"], sum(p.ds_numel for p in params or []))
        return gathered(params)

    def watched(eng):  # noqa: ANN001, ANN202
        eng._engine()  # the training engine's own (lazy) construction is not the copy's
        with _Allocations() as alloc:
            copy = build(eng)
        seen["largest_fp32"] = max(seen["largest_fp32"], alloc.largest_fp32)
        seen["dtypes"] |= {str(p.dtype) for p in copy.parameters()}
        seen["copy_numel"] = sum(p.numel() for p in copy.parameters())
        seen["copies"] += 1
        return copy

    engine.gathered_parameters = counting_gather
    ro._generation_copy = watched
    return seen


def _frozen_state(engine) -> dict:  # noqa: ANN001
    """What a frozen role (the reference) holds beyond its weights: DeepSpeed's optimizer and fp32 master."""
    ds = engine._engine()
    opt = ds.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", [])
    params = list(engine.trained_module.parameters())
    # ppo.offload_frozen: DeepSpeed's ZeRO-3 parameter offload to host memory ("none" / None when off)
    device = getattr(ds.zero_offload_param(), "device", None)
    device = getattr(device, "value", device)
    return {"optimizer": type(opt).__name__ if opt is not None else None,
            "param_offload": None if device in (None, "none") else str(device),
            "fp32_master_numel": sum(t.numel() for t in flat),
            "weight_dtypes": sorted({str(getattr(p, "ds_tensor", p).dtype) for p in params}),
            "trainable": any(p.requires_grad for p in params)}


def run_layout(out: Path, name: str, overrides: list[str]) -> None:
    cfg = PPOConfig.from_toml(None, BASE + overrides + [f"--run.dir={out / name}"])
    trainer = PPOTrainer(cfg, print_fn=lambda *a, **k: None)
    topo = trainer.topo
    copies = _watch_rollout_copy(trainer)
    records = []
    for it in range(ITERATIONS):  # the second one has a policy != reference: the KL penalty is active
        exp, record = trainer.collect(it)
        record.update(trainer.update(exp))
        records.append({k: v for k, v in record.items() if not k.endswith("_time_s") and k != "rollout_tokens_per_s"})
    mine = {str(s.prompt.index): {"answer": s.answer, "score": float(exp.reward.score[i]),
                                  "old_logp": exp.old_logp[i].tolist(), "ref_logp": exp.ref_logp[i].tolist(),
                                  "values": exp.values[i].tolist(), "advantages": exp.advantages[i].tolist()}
            for i, s in enumerate(exp.samples)}
    parts: list = [None] * topo.world_size
    if topo.world_size > 1:
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    per_prompt: dict = {}
    for part in parts:
        per_prompt.update(part)
    trainer.export("final_policy")
    trainer.export("final_value", value=True)
    if topo.global_rank == 0:
        copies["dtypes"] = sorted(copies["dtypes"])
        (out / name / "result.json").write_text(json.dumps({"metrics": records, "prompts": per_prompt,
                                                            "rollout_copy": copies,
                                                            "sequence_parallel": {
                                                                role: [engine.sequence_parallel, engine.padded_batches]
                                                                for role, engine in (("policy", trainer.policy),
                                                                                     ("value", trainer.value))},
                                                            "frozen": _frozen_state(trainer.reference)}))


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, joined = spec.partition("=")
        overrides = [o for o in joined.split(",") if o]
        # "@eager": the eager formulas (the GPU path), kernels.disabled() being the in-process LLAMA_CPU_KERNELS=0
        with kernels.disabled() if EAGER in overrides else contextlib.nullcontext():
            run_layout(out, name, [o for o in overrides if o != EAGER])


if __name__ == "__main__":
    main()
