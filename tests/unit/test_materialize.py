"""Meta-device construction (``model/materialize.py``, used by ``train.parallelize.build_module`` and each pipeline
stage): nothing is drawn, parameter objects / attributes / ties survive, and the engine's seeded init then gives
the same weights as a model built the ordinary way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from model.config import get_config
from model.layers import LocalLayers
from model.llama import Llama, init_llama_weights
from model.materialize import build_unfilled, materialize
from train.config import EngineConfig
from train.objective import LanguageModelObjective
from train.parallelize import build_module

pytestmark = pytest.mark.timeout(60)


def test_meta_construction_draws_nothing_and_allocates_on_device() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = build_unfilled(lambda: Llama(get_config("debug_tiny")), device="cpu")
    # torch's default init (nn.Linear's kaiming_uniform_, nn.Embedding's normal_) would advance the global RNG
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    torch.manual_seed(0)
    Llama(get_config("debug_tiny"))  # the ordinary build does draw: the check above can fail
    assert not torch.equal(torch.get_rng_state(), before)


def test_seeded_weights_and_outputs_equal_the_ordinary_build() -> None:
    cfg = get_config("debug_tiny")
    plain, unfilled = Llama(cfg), build_unfilled(lambda: Llama(cfg), device="cpu")
    for model in (plain, unfilled):
        init_llama_weights(model, seed=3)
    for (name, a), (_, b) in zip(plain.named_parameters(), unfilled.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(plain(tokens), unfilled(tokens))  # the RoPE tables were computed off the meta device


def test_parameter_objects_attributes_and_ties_are_kept() -> None:
    with torch.device("meta"):
        model = Llama(dataclasses.replace(get_config("debug_tiny"), tie_embeddings=True))
    embedding = model.tok_embeddings.weight
    embedding.tp_shard = "marker"
    materialize(model, device="cpu", dtype=torch.bfloat16)
    assert model.tok_embeddings.weight is embedding and embedding.tp_shard == "marker"
    assert model.output.weight is model.tok_embeddings.weight
    assert embedding.dtype == torch.bfloat16 and not embedding.is_meta


def test_a_meta_tensor_attribute_is_an_error_naming_it() -> None:
    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.table = torch.arange(4.0)  # computed in __init__ without a device: meta under construction

    with pytest.raises(RuntimeError, match=r"Table \(root\)\.table"):
        build_unfilled(Table, device="cpu")


def test_build_module_builds_unfilled_and_keeps_trainability() -> None:
    cfg = get_config("debug_tiny")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    module = build_module(cfg, EngineConfig(global_batch_size=2, micro_batch_size=1), objective=LanguageModelObjective(), layers=LocalLayers())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.requires_grad and not p.is_meta for p in module.parameters())


def test_skipped_default_init_draws_nothing_but_keeps_tensor_ops() -> None:
    """ZeRO-3 builds inside ``deepspeed.zero.Init`` with ``skipped_default_init`` (real memory, then partitioned):
    torch's random fills are skipped, the tensor ops the partitioning runs are not."""
    from model.materialize import skipped_default_init

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with skipped_default_init():
        layer = nn.Linear(8, 8)
        doubled = torch.ones(3).mul_(2.0)
    assert torch.equal(torch.get_rng_state(), before) and not layer.weight.is_meta
    assert torch.equal(doubled, torch.full((3,), 2.0))
    nn.Linear(8, 8)  # outside it torch draws again: the check above can fail
    assert not torch.equal(torch.get_rng_state(), before)
