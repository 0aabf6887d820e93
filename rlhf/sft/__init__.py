"""Supervised fine-tuning (Llama 2 sec. 3.1): ``python -m rlhf.sft --config configs/rlhf/sft_hh_tiny.toml ...``.

- ``config.py``: ``SFTConfig`` (the run sections + ``[sft]``);
- ``train.py``: ``SFTTask`` (dialogue files -> packed rows), ``run_sft``, the held-out evaluation and ``main``.
"""
