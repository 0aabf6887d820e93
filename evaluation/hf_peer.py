"""The peer we are measured against: lm-eval's own ``hf`` backend on the same weights, exported to Hugging Face.

    from evaluation.hf_peer import hf_lm
    peer = hf_lm("runs/x-hf", tokenizer="tok.model", batch_size=16)   # an lm_eval HFLM, fp32 on the CPU

Used by the parity tests and ``benchmarks/bench_eval.py`` only; ``transformers`` is a test peer (a dev
dependency), imported here lazily. Our checkpoints carry no Hugging Face tokenizer, so ``hf_tokenizer`` builds a
``transformers`` fast tokenizer that reproduces ours token for token:
- SentencePiece (Llama 1/2, stories260K): BPE merges ordered by piece score, and the model file's own
  normalizer (precompiled charsmap, whitespace collapsing, dummy prefix) as ``tokenizers`` normalizers (the v4
  "legacy" conversion; see ``tests/parity/test_tokenizer_parity.py`` for why the stock class differs);
- tiktoken (Llama 3): transformers' ``TikTokenConverter`` with Meta's split regex and special tokens.
Both add BOS by default, as the Llama tokenizers on the hub do, which is what lm-eval's ``hf`` backend expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.tokenizer import LLAMA3_PAT_STR, Llama3Tokenizer, load_tokenizer


def hf_tokenizer(path: str | Path) -> Any:
    """A ``transformers`` tokenizer equal to ``model.tokenizer.load_tokenizer(path)`` (BOS added by default)."""
    ours = load_tokenizer(path)
    if isinstance(ours, Llama3Tokenizer):
        return _hf_tiktoken(Path(path), ours)
    return _hf_sentencepiece(Path(path))


def _hf_sentencepiece(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, normalizers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    hf = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_prefix_space=True, add_bos_token=True,
                        unk_token=proto.pieces[0].piece)
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        # sentencepiece collapses runs of spaces and drops leading/trailing spaces (spaces only, not newlines;
        # \A and \z because the regex engine (Oniguruma) reads ^ and $ as line anchors).
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A +| +\z"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    hf.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    hf.backend_tokenizer.pre_tokenizer = None
    if hf.pad_token is None:
        hf.pad_token = hf.unk_token  # ours pads with <unk> too (model.tokenizer.SentencePieceTokenizer)
    return hf


def _hf_tiktoken(path: Path, ours: Llama3Tokenizer) -> Any:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(ours.special_tokens, key=ours.special_tokens.__getitem__)
    backend = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_PAT_STR, extra_special_tokens=specials).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                 eos_token="<|end_of_text|>", pad_token="<|reserved_special_token_2|>",
                                 add_bos_token=True)
    return hf


def hf_model(checkpoint: str | Path) -> Any:
    """``LlamaForCausalLM`` from a Hugging Face export of our checkpoint, fp32, eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def hf_lm(checkpoint: str | Path, *, tokenizer: str | Path, batch_size: int = 16, **kwargs: Any) -> Any:
    """lm-eval's ``HFLM`` (the ``hf`` backend) over ``hf_model`` + ``hf_tokenizer``, on the CPU in fp32."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_model(checkpoint), tokenizer=hf_tokenizer(tokenizer), batch_size=batch_size,
                device="cpu", dtype=torch.float32, **kwargs)
