"""Command line for the model family: inspect configs, convert checkpoints, generate, tokenize.

    python -m model info llama3_1_405b --json
    python -m model convert --from llama2c --to native --input stories260K.bin --output ckpt/stories
    python -m model convert --from hf --to meta --input hf_dir --output meta_dir   # loads in Meta's Llama.build
    python -m model generate --checkpoint ckpt/stories --tokenizer tok512.model --bos-only \
        --max-new-tokens 200 --temperature 0
    echo "Hello world" | python -m model tokenize --tokenizer tokenizer.model --bos
    echo '[{"role": "user", "content": "Hi"}]' | python -m model tokenize --tokenizer t.model --chat llama3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.config import LlamaConfig, get_config, known_configs


def _info(args: argparse.Namespace) -> int:
    try:
        cfg = get_config(args.name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = describe_config(cfg)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        width = max(map(len, record))
        for key, value in record.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def describe_config(cfg: LlamaConfig) -> dict[str, object]:
    """The public summary printed by ``model info`` (stable keys; outside checks read them)."""
    return {
        "name": cfg.name,
        "params": cfg.num_params(),
        "layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": cfg.n_heads,
        "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "ffn_dim": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else vars(cfg.rope_scaling),
        "max_seq_len": cfg.max_seq_len,
        "bf16_weights_gib": round(cfg.num_params() * 2 / 2**30, 2),
    }


def _convert(args: argparse.Namespace) -> int:
    """Streams: native/HF inputs are read one tensor at a time, and every output is written that way."""
    import torch

    from model.checkpoints import open_checkpoint, write_checkpoint

    reader = open_checkpoint(args.input, format=args.from_format)
    cfg = reader.cfg
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    write_checkpoint(reader, cfg, args.output, format=args.to_format, max_shard_bytes=args.max_shard_size,
                     dtype=dtype, overwrite=args.overwrite)
    print(f"converted {args.input} ({args.from_format}) -> {args.output} ({args.to_format}): "
          f"{cfg.num_params():,} parameters, {cfg.n_layers} layers")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoints import from_pretrained
    from model.generate import generate
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    model = from_pretrained(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bos_only:
        prompt = [tokenizer.bos_id]
    elif args.prompt is None:
        print("error: give --prompt TEXT or --bos-only", file=sys.stderr)
        return 2
    else:
        prompt = tokenizer.encode(args.prompt, bos=True)
    completion = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, stop_ids=tokenizer.stop_ids, seed=args.seed)[0]
    if args.ids:
        print(json.dumps(completion))
    else:
        print(("" if args.bos_only else args.prompt) + tokenizer.decode(completion) if args.echo
              else tokenizer.decode(completion))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    text = sys.stdin.read()
    if args.chat:
        from model.chat import encode_chat, parse_messages

        messages = parse_messages(json.loads(text))
        encoding = encode_chat(tokenizer, messages, template=args.chat,
                               add_generation_prompt=args.generation_prompt, date=args.date)
        print(json.dumps({"ids": encoding.ids, "assistant_mask": encoding.assistant_mask}))
    else:
        print(json.dumps(tokenizer.encode(text, bos=args.bos, eos=args.eos)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shapes and parameter count of a registered config")
    info.add_argument("name", help=f"one of: {', '.join(known_configs())}")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)

    convert = sub.add_parser("convert", help="convert a checkpoint between formats")
    convert.add_argument("--from", dest="from_format", required=True, choices=["hf", "meta", "llama2c", "native"])
    convert.add_argument("--to", dest="to_format", required=True, choices=["hf", "native", "meta"])
    convert.add_argument("--input", required=True, type=Path)
    convert.add_argument("--output", required=True, type=Path)
    convert.add_argument("--max-shard-size", default="5GB",
                         help="hf/native: split weights into files of at most this size (Hugging Face's \"5GB\")")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="cast every tensor (default: keep the input's dtypes)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    convert.set_defaults(func=_convert)

    gen = sub.add_parser("generate", help="complete a prompt with the KV-cache generator")
    gen.add_argument("--checkpoint", required=True, type=Path, help="native or HF checkpoint directory")
    gen.add_argument("--tokenizer", required=True, type=Path)
    gen.add_argument("--prompt")
    gen.add_argument("--bos-only", action="store_true", help="start from BOS alone")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, default=0)
    gen.add_argument("--ids", action="store_true", help="print the generated token ids as JSON")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    gen.set_defaults(func=_generate)

    tok = sub.add_parser("tokenize", help="text (or a chat as JSON messages) on stdin -> token ids")
    tok.add_argument("--tokenizer", required=True, type=Path)
    tok.add_argument("--bos", action="store_true")
    tok.add_argument("--eos", action="store_true")
    tok.add_argument("--chat", choices=["llama2", "llama3"])
    tok.add_argument("--generation-prompt", action="store_true", help="end with an open assistant turn")
    tok.add_argument("--date", help="today's date for the system prompt (YYYY-MM-DD)")
    tok.set_defaults(func=_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
