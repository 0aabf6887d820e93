"""Logit distillation of a frozen teacher into a student sharing its tokenizer: ``python -m rlhf.distill``."""
