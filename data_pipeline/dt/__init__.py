"""The datatrove engine: ``python -m data_pipeline prepare --engine datatrove --executor local|slurm|ray``.

    python -m data_pipeline prepare --engine datatrove --executor local --tasks 2 --workers 2 \\
        --source c4=../shared/data/c4 --tokenizer TOK --output runs/data
    python -m data_pipeline prepare --engine datatrove --executor slurm --tasks 64 --workers 32 \\
        --partition cpu --source cc=/shared/cc --tokenizer TOK --output /shared/runs/data [--wait]

The same documents and token shards as the local engine (``data_pipeline/tokenize_shards.py``), computed by
HuggingFace datatrove's executors (one machine, SLURM job arrays chained with ``afterok``, Ray) so that the
dedup state is spread over files on a shared filesystem instead of one process's memory. This sub-package is
the only place that imports datatrove: ``steps`` (our readers, cleaning rules, language id, tokenizer and
per-filter report as datatrove pipeline steps), ``line_dedup`` (our line dedup in the signature / find /
filter shape of datatrove's dedups), ``minhash_stages`` (datatrove's MinHash stages with our signatures and
our near-duplicate rule), ``engine`` (the chained stages, executors, resume, final merge and manifest).
"""
