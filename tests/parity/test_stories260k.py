"""A real trained checkpoint end to end: llama2.c's stories260K must reproduce its greedy continuation.

    pytest tests/parity/test_stories260k.py

The reference (``greedy_reference.json``, 200 tokens from BOS) comes from an independent float64
re-implementation of llama2.c's forward and decodes to the text llama2.c's own test expects. Matching it
exactly checks the llama2.c reader, the adjacent-pair -> half-split q/k permutation (for GQA keys too),
tied embeddings, and the network itself.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.checkpoints import detect_format, from_pretrained, load_checkpoint
from tests.conftest import require_file

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stories(shared_data: Path) -> tuple[Path, dict]:
    folder = shared_data / "checkpoints" / "stories260K"
    checkpoint = require_file(folder / "stories260K.bin")
    reference = json.loads(require_file(folder / "greedy_reference.json").read_text())
    return checkpoint, reference


def test_config_from_header(stories: tuple[Path, dict]) -> None:
    checkpoint, _ = stories
    assert detect_format(checkpoint) == "llama2c"
    cfg, state_dict = load_checkpoint(checkpoint)
    assert (cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert cfg.tie_embeddings and state_dict["output.weight"] is state_dict["tok_embeddings.weight"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """A 64-wide model is all per-op overhead: one thread is ~10x faster than two contending ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_greedy_matches_reference(stories: tuple[Path, dict], one_thread: None) -> None:
    checkpoint, reference = stories
    model = from_pretrained(checkpoint)
    tokens = list(reference["prompt_ids"])
    assert tokens == [1]
    with torch.inference_mode():  # no cache: recompute the whole prefix each step (seq <= 201, cheap)
        for _ in range(len(reference["token_ids"])):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert tokens[1:] == reference["token_ids"]


def test_kv_cache_generator_matches_reference(stories: tuple[Path, dict], one_thread: None) -> None:
    try:
        generate = importlib.import_module("model.generate").generate
    except (ImportError, AttributeError):
        pytest.skip("model.generate.generate is not available yet")
    checkpoint, reference = stories
    model = from_pretrained(checkpoint)
    with torch.no_grad():
        out = generate(model, [list(reference["prompt_ids"])], max_new_tokens=len(reference["token_ids"]),
                       temperature=0.0)
    assert out[0] == reference["token_ids"]
