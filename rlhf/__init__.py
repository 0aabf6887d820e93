"""Alignment stage: SFT, reward models, rejection sampling, PPO and Ghost Attention (Llama 2 sec. 3).

The pure-function layer lives in two modules that every stage shares:

- ``rlhf.losses``: the losses and tensor math (ranking loss with Llama 2 margins, KL estimators, GAE, the PPO
  clipped surrogate and value loss, the Llama 2 combined/whitened PPO reward, SFT cross-entropy).
- ``rlhf.data``: readers for dialogue and preference JSONL files and the Anthropic HH-RLHF format, the
  hash-based train/valid split and the Llama 2 reward-model data mixtures. Readers never drop a record
  silently: every skip is counted by reason, with file and line, in a ``ReadReport``.

Their tests: ``pytest tests/unit/test_losses.py tests/unit/test_rlhf_data.py``.
"""
