"""Alignment (Llama 2 sec. 3): SFT, reward models, rejection sampling, PPO and Ghost Attention.

Shared pieces at the top, one package per stage below (a stage imports the shared pieces, never another stage's
private names; ``tests/unit/test_import_graph.py`` checks it):

- ``losses.py``: the losses and tensor math (ranking loss with Llama 2 margins, KL estimators, GAE, the PPO
  clipped surrogate and value loss, the Llama 2 combined/whitened reward, SFT cross-entropy);
- ``data.py``: readers for dialogue and preference JSONL and the Anthropic HH-RLHF format, the hash-based
  train/valid split and the Llama 2 reward-model mixtures. Readers never drop a record silently: every skip is
  counted by reason, with file and line, in a ``ReadReport``;
- ``sources.py``: data files -> train / held-out records (format sniffing), and the one ``Prompt`` type with
  its reader ``load_prompts``;
- ``batching.py``: chat encoding, SFT packing, pair collation and the global-batch loader;
- ``paths.py`` (``{data_dir}``, run dir -> export), ``config.py`` (the base of the SFT / RM configs),
  ``stage.py`` (the loop task and CLI SFT and RM share), ``synthetic.py`` (tiny data for tests);
- ``sft/`` (``python -m rlhf.sft``), ``reward/`` (``python -m rlhf.reward``, ``python -m rlhf.evaluate_rm``),
  ``rejection_sampling.py`` (``python -m rlhf.rejection_sampling``), ``ppo/`` (``python -m rlhf.ppo``),
  ``gatt/`` (``python -m rlhf.gatt``).

Their tests: ``pytest tests/unit/test_losses.py tests/unit/test_rlhf_data.py tests/unit/test_rlhf_batching.py
tests/unit/test_reward_model.py tests/unit/test_ppo.py tests/unit/test_gatt.py``.
"""
