"""Unit tests of the Llama network: registry shapes and exact counts, RoPE scaling, masks, KV cache, generation."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import LlamaConfig, RopeScaling, get_config, known_configs
from model.generate import generate, sample_next_token
from model.llama import Llama, init_llama_weights
from model.rope import rope_inverse_frequencies

pytestmark = pytest.mark.timeout(120)

# Exact published counts (REFERENCE.md), computed from the shapes.
PUBLISHED = {
    "llama1_7b": 6_738_415_616, "llama1_13b": 13_015_864_320, "llama1_33b": 32_528_943_616,
    "llama1_65b": 65_285_660_672, "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320,
    "llama2_34b": 33_743_970_304, "llama2_70b": 68_976_648_192, "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496, "llama3_1_405b": 405_853_388_800,
}
FFN = {"llama1_7b": 11008, "llama1_13b": 13824, "llama1_33b": 17920, "llama1_65b": 22016, "llama2_34b": 22016,
       "llama2_70b": 28672, "llama3_1_8b": 14336, "llama3_1_70b": 28672, "llama3_1_405b": 53248}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_meta_device_parameter_count_equals_published(name: str) -> None:
    cfg = get_config(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == PUBLISHED[name] == cfg.num_params()
    if name in FFN:
        assert cfg.ffn_dim == FFN[name]
    assert cfg.head_dim == 128


def test_registry_fields_follow_reference() -> None:
    assert get_config("llama1_7b").norm_eps == 1e-6 and get_config("llama1_65b").norm_eps == 1e-5
    assert get_config("llama1_33b").max_seq_len == 2048 and get_config("llama2_7b").max_seq_len == 4096
    l31 = get_config("llama3_1_405b")
    assert (l31.vocab_size, l31.kv_heads, l31.rope_theta, l31.max_seq_len) == (128256, 8, 5e5, 131072)
    assert l31.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert get_config("llama2_70b").kv_heads == 8 and get_config("llama2_13b").kv_heads == 40


def test_unknown_config_lists_known_names() -> None:
    with pytest.raises(ValueError, match="llama3_1_8b"):
        get_config("llama4_1t")
    assert "debug_tiny" in known_configs()


def test_invalid_config_names_field_and_fix() -> None:
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3).validate()
    with pytest.raises(ValueError, match="unknown model config fields"):
        LlamaConfig.from_dict({"dim": 64, "n_heads": 4, "bogus": 1})


def test_config_json_roundtrip(tmp_path) -> None:
    cfg = get_config("debug_llama3_tiny")
    cfg.save(tmp_path / "c.json")
    assert LlamaConfig.load(tmp_path / "c.json") == cfg


def test_llama31_rope_scaling_matches_reference_formula() -> None:
    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    got = rope_inverse_frequencies(128, 500000.0, scaling)
    base = [1.0 / 500000.0 ** (i / 128) for i in range(0, 128, 2)]
    for f, g in zip(base, got.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * f / 8 + smooth * f
        assert g == pytest.approx(want, rel=1e-6)


def _tiny(name: str = "debug_tiny", seed: int = 0) -> Llama:
    model = Llama(get_config(name)).eval()
    init_llama_weights(model, seed=seed)
    return model


def test_forward_shapes_and_hidden() -> None:
    model = _tiny()
    tokens = torch.randint(0, 512, (2, 17))
    assert model(tokens).shape == (2, 17, 512)
    assert model(tokens, return_hidden=True).shape == (2, 17, 64)


def test_init_is_deterministic_and_seed_dependent() -> None:
    a, b, c = _tiny(seed=1), _tiny(seed=1), _tiny(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc)


def test_document_mask_isolates_documents() -> None:
    """Packed [doc A | doc B]: B's outputs equal B run alone (positions restarted), A's equal A alone."""
    model = _tiny()
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, positions=positions, document_ids=doc_ids)
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=0)
        # Without the mask, B's tokens do see A: outputs differ.
        assert (model(packed)[:, 7:] - model(b)).abs().max() > 1e-3


def _greedy_no_cache(model: Llama, prompt: list[int], steps: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(token)
            seq.append(token)
    return out


@pytest.mark.parametrize("name", ["debug_tiny", "debug_llama2_tiny", "debug_llama3_tiny"])
def test_kv_cache_batched_greedy_equals_full_recompute(name: str) -> None:
    model = _tiny(name)
    prompts = [[1, 5, 9, 33, 7, 100], [1, 44], [1, 3, 3, 3]]
    got = generate(model, prompts, max_new_tokens=12)
    for prompt, completion in zip(prompts, got):
        assert completion == _greedy_no_cache(model, prompt, 12)


def test_stop_tokens_and_max_new_tokens() -> None:
    model = _tiny()
    free = generate(model, [[1, 2, 3]], max_new_tokens=10)[0]
    assert len(free) == 10
    stop = free[4]
    first = free.index(stop)
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=10, stop_ids=[stop])[0]
    assert stopped == free[:first]


def test_sampling_is_deterministic_under_seed_and_top_p_restricts() -> None:
    model = _tiny()
    prompts = [[1, 2, 3], [1, 9]]
    a = generate(model, prompts, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, prompts, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, prompts, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c
    logits = torch.tensor([[5.0, 4.0, 0.0, -3.0]])
    # top_p=0.5: only the argmax survives (its mass ~0.73 already exceeds 0.5).
    draws = {int(sample_next_token(logits, temperature=1.0, top_p=0.5)) for _ in range(50)}
    assert draws == {0}


def test_generate_refuses_context_overflow() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(model, [[1] * 200], max_new_tokens=100)
