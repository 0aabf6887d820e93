"""PPO with the Llama 2 combined reward (sec. 3.2.3): ``python -m rlhf.ppo --config configs/rlhf/ppo_tiny.toml``.

- ``config.py``: ``PPOConfig``;            ``trainer.py``: ``PPOTrainer`` (the five roles, one iteration, the run);
- ``prompts.py``: the prompt set, held-out split, per-iteration order and DP shards;
- ``rollout.py``: KV-cache sampling (ZeRO-3: one gather), collation, scoring passes;
- ``roles.py``: the policy and scalar-head (value) engine objectives;
- ``rewards.py``: scorers (reward models, token rules) and the combined, whitened reward;
- ``guards.py``: KL / reward alarms, non-finite iterations, early stopping;   ``metrics.py``: JSONL + wandb.
"""
