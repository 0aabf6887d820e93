"""Reward models (Llama 2 sec. 3.2.2): ``python -m rlhf.reward --config configs/rlhf/rm_*.toml ...``.

- ``config.py``: ``RewardConfig`` (the run sections + ``[rm]``);
- ``model.py``: ``RewardModel`` (backbone + scalar head), its engine objective, save / load of the export;
- ``scorer.py``: ``RewardScorer`` (scores (prompt, answer) pairs with an export);
- ``train.py``: ``RewardTask`` (preference files -> the Llama 2 mixtures), ``run_reward`` and ``main``;
- ``evaluate.py``: accuracy tables per test set and rating (``python -m rlhf.evaluate_rm``).
"""
