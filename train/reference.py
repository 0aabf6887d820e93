"""The exactness reference: a plain PyTorch training loop, no DeepSpeed, no process group.

    from train.reference import ReferenceEngine
    result = train(cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology)

Same model (``Llama`` with ``LocalLayers``), same layout-independent initialisation, same data order (the
loader hands one process the whole global batch), same objective (sum of token losses / global loss
tokens), ``torch.optim.AdamW`` with the same parameter groups, ``clip_grad_norm_``, the same LR schedule
(set by the loop). Every distributed layout is compared against it: per-step losses and final weights within
1e-5 in fp32 (``tests/distributed``). It has ``TrainEngine``'s interface, so the real loop drives it; it is
also the "plain PyTorch loop" peer of the overhead benchmark.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from model.config import LlamaConfig
from model.llama import Llama, init_llama_weights
from train.objective import decay_groups, masked_loss_sum


def single_process_topology(cfg: Any = None) -> SimpleNamespace:
    """The topology of one process with no process group."""
    return SimpleNamespace(global_rank=0, world_size=1, dp_size=1, dp_rank=0, tp_size=1, pp_size=1, tp_rank=0,
                           pp_rank=0, is_first_stage=True, is_last_stage=True, device=torch.device("cpu"))


class ReferenceEngine:
    """``TrainEngine``'s interface over one plain model and ``torch.optim.AdamW``."""

    def __init__(self, *, model_cfg: LlamaConfig, run_cfg: Any, topology: Any = None) -> None:
        self.model = Llama(model_cfg)
        init_llama_weights(self.model, seed=run_cfg.train.seed)
        self.model.checkpoint_every = run_cfg.parallel.activation_checkpoint_every
        o = run_cfg.optim
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, o.weight_decay), lr=0.0,
                                           betas=(o.beta1, o.beta2), eps=o.eps)
        self.gas = run_cfg.train.global_batch_size // run_cfg.train.micro_batch_size
        self.clip = o.grad_clip
        self.document_mask = run_cfg.data.document_mask

    def _loss_sum(self, mb: dict[str, Tensor]) -> Tensor:
        logits = self.model(mb["input_ids"], document_ids=mb["document_ids"] if self.document_mask else None)
        return masked_loss_sum(logits, mb["labels"], mb["loss_mask"], tp_size=1)

    def train_step(self, micro_batches: Any, lr: float) -> SimpleNamespace:
        batches = [next(micro_batches) for _ in range(self.gas)]
        tokens = max(float(sum(float(mb["loss_mask"].sum()) for mb in batches)), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for mb in batches:
            loss = self._loss_sum(mb) / tokens
            loss.backward()
            total += float(loss.detach())
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        skipped = not (math.isfinite(total) and math.isfinite(norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return SimpleNamespace(loss=total, grad_norm=norm, skipped=skipped, tokens=int(tokens))

    @torch.no_grad()
    def eval_loss(self, micro_batches: Any, num_batches: int) -> float:
        self.model.eval()
        total, count = 0.0, 0.0
        for _ in range(num_batches):
            mb = next(micro_batches)
            total += float(self._loss_sum(mb))
            count += float(mb["loss_mask"].sum())
        self.model.train()
        return total / max(count, 1.0)

    def save(self, path: Path, client_state: dict[str, Any]) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "client": client_state}, Path(path) / "reference.pt")

    def load(self, path: Path) -> dict[str, Any]:
        state = torch.load(Path(path) / "reference.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return dict(state["client"])

    def consolidated_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
