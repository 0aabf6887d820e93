"""Data pipeline: raw corpora -> cleaned documents -> megatron .bin/.idx shards -> blends -> training loader.

    python -m data_pipeline prepare --source NAME=PATH[:FORMAT] ... --tokenizer PATH --output DIR [--workers N]
    python -m data_pipeline prepare --engine datatrove --executor local|slurm|ray --tasks N ...   # distributed
    python -m data_pipeline inspect DIR

Modules: readers (streaming formats), cleaning (+ minhash, langid), tokenize_shards (workers, manifest,
resume), shard_io (megatron .bin/.idx checks), blend (mixtures, Llama 1 preset, epochs), loader (training),
dt/ (the datatrove engine: the same rules as datatrove pipeline steps on its executors; the only package
that imports datatrove).
"""
