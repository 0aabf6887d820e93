"""LoRA adapters (model/lora.py) on one process: exactness at B = 0, merging, optimizer state, bf16 base, files.

    python -m pytest -q tests/unit/test_lora.py

The tensor-parallel and ZeRO forms are checked against this one-process form in tests/distributed/test_lora_parity.py;
the PEFT files against ``peft`` itself in tests/parity/test_lora_peft.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from model.checkpoints import MemoryReader
from model.checkpoints.lora_adapters import MergedReader, peft_name, read_peft_adapter, write_peft_adapter
from model.config import get_config
from model.llama import Llama, init_llama_weights
from model.lora import LoRASpec, adapter_parameters, adapter_state_dict, apply_lora, merge_lora

pytestmark = pytest.mark.timeout(120)

CFG = get_config("debug_tiny")
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def base_model(seed: int = 3) -> Llama:
    model = Llama(CFG)
    init_llama_weights(model, seed=seed)
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(model: Llama, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())


def train_adapters(model: Llama, steps: int = 3, lr: float = 1e-2) -> torch.optim.AdamW:
    from train.objective import decay_groups

    optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=lr)  # the engines' grouping: trainable only
    for step in range(steps):
        optimizer.zero_grad()
        lm_loss(model, *batch(step)).backward()
        optimizer.step()
    return optimizer


def test_b_zero_first_step_equals_full_model() -> None:
    full = base_model()
    lora = copy.deepcopy(full)
    apply_lora(lora, LoRASpec(rank=4, targets=ALL), seed=1)
    inputs, labels = batch()
    full_loss, lora_loss = lm_loss(full, inputs, labels), lm_loss(lora, inputs, labels)
    # B = 0 adds exact zeros; what differs is only the GEMM grouping (adapted layers cannot take the fused path).
    assert (full(inputs) - lora(inputs)).abs().max().item() <= 1e-5
    assert abs(full_loss.item() - lora_loss.item()) <= 1e-6
    lora_loss.backward()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapter_parameters(lora)} and len(trainable) == 2 * 7 * CFG.n_layers
    # B = 0: only B gets a gradient at the first step (dL/dA = B^T ... = 0), and it is not zero.
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert all(float(g.abs().sum()) == 0.0 for n, g in grads.items() if ".lora_A." in n)
    assert all(float(g.abs().sum()) > 0.0 for n, g in grads.items() if ".lora_B." in n)
    assert all(p.grad is None for n, p in lora.named_parameters() if not p.requires_grad)


def test_merged_weights_give_adapter_logits_and_names_are_kept() -> None:
    model = base_model()
    names_before = [n for n, _ in model.named_parameters()]
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("q", "v", "down")), seed=2)
    train_adapters(model)
    assert [n for n, _ in model.named_parameters() if ".lora_" not in n] == names_before
    inputs, _ = batch(9)
    with torch.no_grad():
        adapted = model(inputs)
        base_logits = base_model()(inputs)
        assert (adapted - base_logits).abs().max() > 1e-3  # the adapters did change the model
        assert merge_lora(model) == 3 * CFG.n_layers
        merged = model(inputs)
    assert [n for n, _ in model.named_parameters()] == names_before
    assert (merged - adapted).abs().max().item() <= 1e-5


def test_optimizer_state_is_only_the_adapters() -> None:
    """Adam's moments, measured in bytes after a step: 2 x the adapter bytes, not 2 x the model's."""
    model = base_model()
    spec = LoRASpec(rank=4, targets=ALL)
    apply_lora(model, spec, seed=0)
    optimizer = train_adapters(model, steps=1)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                      if k != "step")
    adapter_bytes = sum(p.numel() * p.element_size() for _, p in adapter_parameters(model))
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    assert state_bytes == 2 * adapter_bytes
    assert adapter_bytes < 0.2 * base_bytes
    full = base_model()
    full_optimizer = torch.optim.AdamW(full.parameters())
    lm_loss(full, *batch()).backward()
    full_optimizer.step()
    full_state = sum(t.numel() * t.element_size() for s in full_optimizer.state.values() for k, t in s.items()
                     if k != "step")
    print(f"Adam state: LoRA r=4 all projections {state_bytes} B vs full fine-tuning {full_state} B")
    assert full_state == 2 * base_bytes


def test_bf16_base_halves_frozen_projections_and_stays_close() -> None:
    fp32 = base_model()
    apply_lora(fp32, LoRASpec(rank=4), seed=5)
    bf16 = base_model()
    apply_lora(bf16, LoRASpec(rank=4, base_dtype="bf16"), seed=5)
    assert bf16.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert bf16.layers[0].attention.wq.lora_A.weight.dtype == torch.float32
    inputs, labels = batch()
    loss = lm_loss(bf16, inputs, labels)
    loss.backward()
    assert abs(loss.item() - lm_loss(fp32, inputs, labels).item()) < 2e-2
    assert bf16.layers[0].attention.wq.lora_B.weight.grad is not None
    assert merge_lora(bf16) == 4 * CFG.n_layers and bf16.layers[0].attention.wq.weight.dtype == torch.float32


def test_bad_spec_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"lora.targets=.*q_proj"):
        apply_lora(base_model(), LoRASpec(targets=("q_proj",)))
    with pytest.raises(ValueError, match="lora.rank=0"):
        LoRASpec(rank=0).validate()


def test_peft_directory_round_trip_and_streamed_merge(tmp_path: Path) -> None:
    model = base_model()
    spec = LoRASpec(rank=4, alpha=8, targets=("q", "k", "o", "up"))
    apply_lora(model, spec, seed=4)
    train_adapters(model)
    adapters = {n: t.clone() for n, t in adapter_state_dict(model).items()}
    assert peft_name("layers.1.feed_forward.w3.lora_B.weight") == \
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    write_peft_adapter(adapters, spec, tmp_path / "adapter")
    spec_back, adapters_back = read_peft_adapter(tmp_path / "adapter")
    assert spec_back == spec
    assert adapters_back.keys() == adapters.keys()
    assert all(torch.equal(adapters[n], adapters_back[n]) for n in adapters)
    base = base_model()
    reader = MergedReader(MemoryReader(CFG, base.state_dict(), source="base"), adapters_back, spec_back)
    merged = Llama(CFG)
    merged.load_state_dict({n: reader.read(n) for n in merged.state_dict()})
    inputs, _ = batch(5)
    with torch.no_grad():
        assert (merged(inputs) - model(inputs)).abs().max().item() <= 1e-5


def test_adapter_directory_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(tmp_path)
    model = base_model()
    spec = LoRASpec(rank=2)
    apply_lora(model, spec, seed=0)
    write_peft_adapter(adapter_state_dict(model), spec, tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json")
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True"):
        read_peft_adapter(tmp_path / "a")


def test_merge_lora_cli_native_and_hf(tmp_path: Path) -> None:
    """``python -m rlhf.merge_lora``: base (native) + PEFT adapter -> native and HF checkpoints, same logits."""
    from model.checkpoints import from_pretrained, save_checkpoint
    from rlhf.merge_lora import main

    save_checkpoint(base_model().state_dict(), CFG, tmp_path / "base", format="native")
    model = base_model()
    spec = LoRASpec(rank=4, alpha=8, targets=("q", "v", "gate", "down"))
    apply_lora(model, spec, seed=7)
    train_adapters(model)
    write_peft_adapter(adapter_state_dict(model), spec, tmp_path / "adapter")
    inputs, _ = batch(3)
    with torch.no_grad():
        expected = model(inputs)
    for fmt in ("native", "hf"):
        out = tmp_path / f"merged_{fmt}"
        assert main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--output", str(out),
                     "--format", fmt]) == 0
        with torch.no_grad():
            assert (from_pretrained(out)(inputs) - expected).abs().max().item() <= 1e-5
    assert main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2


def test_engine_seam_adapts_the_model_and_keeps_a_reward_head_trainable() -> None:
    """``EngineConfig.lora`` in ``train.parallelize.build_module``: adapters before the objective's wrap, so what the
    wrap adds (the reward model's head) trains; the optimizer groups hold exactly those tensors."""
    from model.layers import LocalLayers
    from rlhf.reward.model import RewardObjective
    from train.config import EngineConfig
    from train.objective import decay_groups
    from train.parallelize import build_module

    spec = LoRASpec(rank=2, targets=("q", "down"))
    cfg = EngineConfig(global_batch_size=2, micro_batch_size=1, lora=spec)
    module = build_module(CFG, cfg, objective=RewardObjective(), layers=LocalLayers())
    trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert any("reward_head" in n for n in trainable)
    assert [n for n in trainable if "reward_head" not in n] == sorted(n for n, _ in adapter_parameters(module))
    assert sum(len(g["params"]) for g in decay_groups(module, 0.1)) == len(trainable)


def test_zero3_refuses_a_bf16_base_by_name() -> None:
    """ZeRO-3 holds the frozen base as partitions in the run's dtype, so ``lora.base_dtype=bf16`` (a per-layer cast
    of whole weights) cannot apply there; the error names the fields and the fix. fp32 is accepted (built at
    ZeRO-3 by ``tests/distributed/test_lora_parity.py``)."""
    from model.layers import LocalLayers
    from train.config import ConfigError, EngineConfig, ZeroSection
    from train.objective import LanguageModelObjective
    from train.parallelize import build_module

    cfg = EngineConfig(global_batch_size=2, micro_batch_size=1, zero=ZeroSection(stage=3),
                       lora=LoRASpec(rank=2, base_dtype="bf16"))
    with pytest.raises(ConfigError, match="lora.base_dtype='bf16' with zero.stage=3.*train.dtype=bf16"):
        build_module(CFG, cfg, objective=LanguageModelObjective(), layers=LocalLayers())
