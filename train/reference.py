"""The exactness reference: a plain PyTorch training loop for any engine objective, no DeepSpeed, no process group.

    from train.reference import ReferenceEngine, single_process_topology
    result = train(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology)
    engine = ReferenceEngine(model_cfg=m, engine_cfg=cfg.engine_config(), objective=RewardObjective())  # an RM

It takes the same ``objective`` and ``init_weights`` arguments as ``train.engine.TrainEngine`` (default: the
language-model objective of pretraining, SFT and GAtt, ``train.objective.LanguageModelObjective``) and does
the same thing in the plainest way: the objective's module with plain layers (``train.parallelize.build_module``,
DeepSpeed never imported), the layout-independent seeded initialisation (``init_llama_weights`` by native
name), the initial weights copied over it, the same data order
(the loader hands one process the whole global batch), the step's loss as the sum of per-item losses over the
global count of ``batch[objective.weight_key]``, ``torch.optim.AdamW`` with the same parameter groups,
``clip_grad_norm_``, the LR schedule set by the loop. Every distributed layout of pretraining, SFT and the
reward model is compared against it: per-step losses and final weights within 1e-5 in fp32
(``tests/distributed``). It has ``TrainEngine``'s interface, so the real loop drives it; it is also the "plain
PyTorch loop" peer of the overhead benchmark and fast enough for in-process end-to-end tests.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from model.config import LlamaConfig
from model.layers import LocalLayers
from model.llama import init_llama_weights
from train.config import EngineConfig
from train.objective import LanguageModelObjective, Objective, decay_groups
from train.parallelize import build_module


def single_process_topology(cfg: Any = None) -> SimpleNamespace:
    """The topology of one process with no process group."""
    return SimpleNamespace(global_rank=0, world_size=1, dp_size=1, dp_rank=0, tp_size=1, pp_size=1, tp_rank=0,
                           pp_rank=0, is_first_stage=True, is_last_stage=True, device=torch.device("cpu"))


class ReferenceEngine:
    """``TrainEngine``'s interface (train_step, eval_loss, save/load, consolidated_state_dict) in one process."""

    def __init__(self, *, model_cfg: LlamaConfig, engine_cfg: EngineConfig, topology: Any = None,
                 objective: Objective | None = None, init_weights: Any = None) -> None:
        self.objective = objective or LanguageModelObjective(document_mask=engine_cfg.document_mask)
        self.engine_cfg = engine_cfg
        self.module = build_module(model_cfg, engine_cfg, objective=self.objective, layers=LocalLayers())
        init_llama_weights(self.module, seed=engine_cfg.seed, n_layers=model_cfg.n_layers,
                           native_name=self.objective.native_name)
        if init_weights is not None:  # a dict of full tensors or a WeightReader (open_checkpoint)
            names = set(init_weights.names() if hasattr(init_weights, "names") else init_weights)
            read = init_weights.read if hasattr(init_weights, "read") else init_weights.__getitem__
            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    native = self.objective.native_name(name)
                    if native in names:
                        param.copy_(read(native).to(param.dtype))
        o = engine_cfg.optim
        self.optimizer = torch.optim.AdamW(decay_groups(self.module, o.weight_decay), lr=0.0,
                                           betas=(o.beta1, o.beta2), eps=o.eps)
        self.gas = engine_cfg.global_batch_size // engine_cfg.micro_batch_size
        self.clip = o.grad_clip

    @property
    def model(self) -> torch.nn.Module:
        """The Llama inside the objective's module (the module itself when it is the model)."""
        return getattr(self.module, "model", self.module)

    def _inputs(self, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: mb[k] for k in self.objective.input_keys}

    def train_step(self, micro_batches: Any, lr: float) -> SimpleNamespace:
        batches = [next(micro_batches) for _ in range(self.gas)]
        key = self.objective.weight_key
        count = max(float(sum(float(mb[key].sum()) for mb in batches)), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        scale = torch.tensor(1.0 / count)
        for mb in batches:
            loss = self.module(**self._inputs(mb), scale=scale)
            loss.backward()
            total += float(loss.detach())
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        skipped = not (math.isfinite(total) and math.isfinite(norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return SimpleNamespace(loss=total, grad_norm=norm, skipped=skipped, tokens=int(count))

    @torch.no_grad()
    def eval_loss(self, micro_batches: Any, num_batches: int) -> float:
        self.module.eval()
        total, count = 0.0, 0.0
        for _ in range(num_batches):
            mb = next(micro_batches)
            total += float(self.module(**self._inputs(mb), scale=torch.tensor(1.0)))
            count += float(mb[self.objective.weight_key].sum())
        self.module.train()
        return total / max(count, 1.0)

    def save(self, path: Path, client_state: dict[str, Any]) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "client": client_state}, Path(path) / "reference.pt")

    def load(self, path: Path) -> dict[str, Any]:
        state = torch.load(Path(path) / "reference.pt", weights_only=True)
        self.module.load_state_dict(state["model"])  # (the whole module, frozen LoRA base included)
        self.optimizer.load_state_dict(state["optimizer"])
        return dict(state["client"])

    def consolidated_state_dict(self) -> dict[str, Tensor]:
        return {self.objective.native_name(k): v.detach().clone() for k, v in self.module.named_parameters()}

    def exported_weights(self, out_dir: Path) -> Any:
        """``TrainEngine.exported_weights`` in one process: the module's own tensors."""
        import contextlib

        from model.checkpoints.lora_adapters import lora_export
        from train.portable import StateDictExport

        export = contextlib.nullcontext(StateDictExport(self.consolidated_state_dict()))
        return lora_export(export, self.engine_cfg.lora, out_dir)
