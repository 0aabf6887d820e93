"""Direct preference optimisation, the Llama 3 way (Llama 3 sec. 4.1.4): ``python -m rlhf.dpo --config ...``.

- ``config.py``: ``DPOConfig`` (the run sections + ``[dpo]``);
- ``model.py``: ``DPOModule`` / ``DPOObjective`` (policy log-probs under TP x ZeRO, the DPO loss of
  ``rlhf.losses``, metrics);
- ``train.py``: ``DPOTask`` (preference files -> encoded pairs, reference log-probs), ``run_dpo`` and ``main``.
"""
