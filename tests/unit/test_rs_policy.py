"""Rejection sampling takes its policy from the export alone (issue 23 item 2): the model shape from
``config.json``, the tokenizer and chat template from ``rlhf.json``, given the export or any stage's run
directory (SFT ``final_model``, PPO ``best_policy`` / ``final_policy``); no flag repeats them, and what is missing
or inconsistent is named with its file and fix."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from model.checkpoints.native import save_native
from model.config import get_config
from model.llama import Llama
from rlhf.export import SIDECAR, policy_meta
from rlhf.paths import checkpoint_dir
from rlhf.rejection_sampling import load_policy, sample_answers
from rlhf.sources import Prompt
from train.config_reader import ConfigError

pytestmark = pytest.mark.timeout(60)
SHAPE = get_config("debug_tiny").replace(name="rs_tiny", dim=32, n_layers=3, n_heads=2, n_kv_heads=1, max_seq_len=96)


def _tokenizer(path: Path) -> Path:
    """A byte-level tiktoken file: 256 ids + Llama 3's 256 special ids = 512, the model's vocabulary."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path


def _export(out: Path, tok: Path, *, stage: str, seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(SHAPE)
    save_native(model, SHAPE, out)
    (out / SIDECAR).write_text(json.dumps(policy_meta(stage=stage, tokenizer=str(tok), template="llama3",
                                                      max_len=64)))
    return model


def test_rs_policy_comes_from_the_export_of_any_stage(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path / "tok.tiktoken")
    ppo = tmp_path / "ppo"
    best = _export(ppo / "best_policy", tok, stage="ppo", seed=1)
    _export(ppo / "final_policy", tok, stage="ppo", seed=2)
    sft = tmp_path / "sft"
    _export(sft / "final_model", tok, stage="sft", seed=3)
    assert checkpoint_dir(ppo) == ppo / "best_policy" and checkpoint_dir(sft) == sft / "final_model"
    assert checkpoint_dir(ppo / "final_policy") == ppo / "final_policy"
    printed: list[str] = []
    model, tokenizer, template = load_policy(ppo, tokenizer=None, template=None, print_fn=printed.append)
    assert model.config == SHAPE and template == "llama3" and tokenizer.vocab_size == SHAPE.vocab_size
    ids = torch.randint(0, SHAPE.vocab_size, (1, 8))
    torch.testing.assert_close(model(ids), best(ids))  # PPO's run dir means its best policy
    assert printed == [f"[rs] policy {ppo / 'best_policy'} (ppo): model rs_tiny from its config.json, tokenizer "
                       f"{tok.resolve()} (rlhf.json), template llama3 (rlhf.json)"]
    # It samples in the export's chat format with the export's tokenizer: nothing else was passed.
    prompts = [Prompt(turns=[{"role": "user", "content": "hi"}], system=None, is_safety=False, source="t", id="a")]
    answers = sample_answers(model, tokenizer, prompts, template=template, k=2, temperature=1.0, top_p=1.0,
                             max_new_tokens=6, seed=0, batch_size=2)
    assert len(answers) == 1 and len(answers[0]) == 2
    # The flags still override: an explicit template wins over rlhf.json.
    assert load_policy(sft, tokenizer=str(tok), template="llama2", print_fn=lambda *a: None)[2] == "llama2"


def test_rs_policy_names_what_is_missing(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path / "tok.tiktoken")
    quiet = {"tokenizer": None, "template": None, "print_fn": lambda *a: None}
    with pytest.raises(ConfigError, match=r"--policy .*nowhere does not exist"):
        load_policy(tmp_path / "nowhere", **quiet)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ConfigError, match=r"no config.json \(the model shape\) .*final_model, best_policy"):
        load_policy(tmp_path / "empty_run", **quiet)
    moved = tmp_path / "moved"
    _export(moved / "final_model", tmp_path / "gone.tiktoken", stage="sft", seed=0)
    with pytest.raises(ConfigError, match=r"rlhf.json: tokenizer .*gone.tiktoken does not exist .*pass --tokenizer"):
        load_policy(moved, **quiet)
    assert load_policy(moved, **{**quiet, "tokenizer": str(tok)})[0].config == SHAPE  # the fix it names works
    bare = tmp_path / "bare"
    save_native(Llama(SHAPE), SHAPE, bare)
    with pytest.raises(ConfigError, match=r"no rlhf.json beside the weights .*pass --tokenizer"):
        load_policy(bare, **quiet)
    small = tmp_path / "small"
    save_native(Llama(SHAPE.replace(vocab_size=300)), SHAPE.replace(vocab_size=300), small)
    with pytest.raises(ConfigError, match=r"has 512 ids but the model 300 .*config.json"):
        load_policy(small, **{**quiet, "tokenizer": str(tok)})


def test_gatt_build_and_eval_take_tokenizer_and_template_from_the_export(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``rlhf.gatt build`` / ``eval`` from a PPO run directory with no --tokenizer / --template: its best policy
    answers, in the chat format and with the tokenizer of its rlhf.json."""
    import rlhf.gatt.data as gatt_data
    from rlhf.gatt.cli import main as gatt

    tok = _tokenizer(tmp_path / "tok.tiktoken")
    ppo = tmp_path / "ppo"
    best = _export(ppo / "best_policy", tok, stage="ppo", seed=1)
    used: list[tuple[object, int, str]] = []

    def answer_fn(model, tokenizer, *, template, **_):  # noqa: ANN001, ANN202 - the real signature's stand-in
        used.append((model, tokenizer.vocab_size, template))
        return lambda batch: [f"answer {i} with {len(m)} messages" for i, m in enumerate(batch)]

    monkeypatch.setattr(gatt_data, "model_answer_fn", answer_fn)
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                          {"role": "assistant", "content": "hi"},
                                                          {"role": "user", "content": "more"}]}) + "\n"
                                 for i in range(4)))
    assert gatt(["build", "--checkpoint", str(ppo), "--dialogues", str(dialogues), "--output",
                 str(tmp_path / "g.jsonl"), "--allow-degenerate"]) == 0
    (model, vocab, template), = used
    assert template == "llama3" and vocab == SHAPE.vocab_size and model.config == SHAPE
    torch.testing.assert_close(model.tok_embeddings.weight, best.tok_embeddings.weight)  # PPO's best policy
    assert (tmp_path / "g.jsonl").is_file()
    used.clear()
    assert gatt(["eval", "--checkpoint", str(ppo), "--dialogues", str(dialogues), "--turns", "2", "--output",
                 str(tmp_path / "eval"), "--template", "llama2"]) == 0
    assert [u[2] for u in used] == ["llama2"]  # the flag still overrides rlhf.json
    bare = tmp_path / "bare"
    save_native(Llama(SHAPE), SHAPE, bare)
    assert gatt(["build", "--checkpoint", str(bare), "--dialogues", str(dialogues), "--output",
                 str(tmp_path / "x.jsonl")]) == 2  # no rlhf.json and no --tokenizer: named, exit 2
