"""The ``python -m model`` command line, run as a user would (subprocesses), on the real shared data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_file

pytestmark = pytest.mark.timeout(180)


def run_model(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)


def test_info_json_has_the_stable_keys() -> None:
    result = run_model("info", "llama3_1_405b", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {k: info[k] for k in ("name", "params", "layers", "dim", "heads", "kv_heads", "ffn_dim", "vocab_size")} == {
        "name": "llama3_1_405b", "params": 405_853_388_800, "layers": 126, "dim": 16384, "heads": 128,
        "kv_heads": 8, "ffn_dim": 53248, "vocab_size": 128256,
    }


def test_info_unknown_name_fails_listing_known_names() -> None:
    result = run_model("info", "llama9_1t")
    assert result.returncode != 0
    assert "llama2_70b" in result.stderr and "llama9_1t" in result.stderr


def test_convert_llama2c_then_generate_reproduces_reference(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "checkpoints" / "stories260K"
    reference = json.loads(require_file(folder / "greedy_reference.json").read_text())
    out = tmp_path / "stories"
    converted = run_model("convert", "--from", "llama2c", "--to", "native", "--input",
                          str(require_file(folder / "stories260K.bin")), "--output", str(out))
    assert converted.returncode == 0, converted.stderr
    hf_out = tmp_path / "stories_hf"
    assert run_model("convert", "--from", "native", "--to", "hf", "--input", str(out),
                     "--output", str(hf_out)).returncode == 0
    for checkpoint in (out, hf_out):
        ids = run_model("generate", "--checkpoint", str(checkpoint), "--tokenizer", str(folder / "tok512.model"),
                        "--bos-only", "--max-new-tokens", "200", "--temperature", "0", "--ids")
        assert ids.returncode == 0, ids.stderr
        assert json.loads(ids.stdout) == reference["token_ids"]
    text = run_model("generate", "--checkpoint", str(out), "--tokenizer", str(folder / "tok512.model"),
                     "--bos-only", "--max-new-tokens", "200", "--temperature", "0")
    assert text.stdout.strip().startswith(reference["expected_text"][:150])


def test_tokenize_plain_and_chat(shared_data: Path) -> None:
    import sentencepiece

    model_file = require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    plain = run_model("tokenize", "--tokenizer", str(model_file), "--bos", stdin="Hello world")
    expected = [1, *sentencepiece.SentencePieceProcessor(model_file=str(model_file)).encode("Hello world")]
    assert json.loads(plain.stdout) == expected
    messages = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    llama3 = require_file(shared_data / "tokenizers" / "llama3" / "tokenizer.model")
    chat = json.loads(run_model("tokenize", "--tokenizer", str(llama3), "--chat", "llama3", stdin=messages).stdout)
    assert chat["ids"][0] == 128000 and chat["ids"][-1] == 128009
    assert len(chat["ids"]) == len(chat["assistant_mask"]) and chat["assistant_mask"][-1] == 1
    assert sum(chat["assistant_mask"]) >= 2  # the answer and its <|eot_id|>
