"""``[eval]`` of a training run: lm-eval tasks and held-out perplexity on the live, sharded model, every N steps.

    python -m train --config configs/pretrain/tiny_cpu.toml --eval.every=20 --eval.tasks=boolq,piqa \
        --eval.limit=50 --eval.tokenizer=TOK --eval.perplexity_data=../shared/data/wikipedia/wikitext-2-raw.test.txt \
        --eval.perplexity_split=wikitext-articles
    python -m train.report RUN_DIR                       # eval.png: one panel per task and perplexity figure

The training loop builds a ``LoopEvaluator`` (named by ``eval.hook``; see ``train/hooks.py`` for why by name)
before its data and engine: the task names, their data files, the tokenizer and the perplexity documents are
checked then, and a bad one is a ``ConfigError`` naming it. At each evaluation every rank runs the adapter of
``evaluation.adapter`` over the engine's own module (``engine.trained_module.model``: this rank's tensor-parallel
shard, whole under ZeRO 1/2), with the work split over the data-parallel ranks and gathered, in eval mode and
under ``torch.inference_mode`` (no weights are copied, no process is started, nothing is exported). The metrics
come back as one flat dict that the loop logs as a ``{"type": "benchmark"}`` record (metrics.jsonl, wandb,
TensorBoard). Pipeline parallelism and ZeRO-3 are refused by ``RunConfig.validate`` (the weights are not whole
on a rank there): evaluate the saved checkpoint with ``python -m evaluation run`` instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from evaluation.parallel import EvalGroups
from train.config_reader import ConfigError


def _tokenizer_path(cfg: Any) -> Path:
    """``eval.tokenizer``, else ``data.tokenizer``, else the tokenizer the prepared data's manifest names."""
    candidates = [cfg.eval.tokenizer, cfg.data.tokenizer]
    if not cfg.data.synthetic and cfg.data.path and (Path(cfg.data.path) / "manifest.json").exists():
        import json

        manifest = json.loads((Path(cfg.data.path) / "manifest.json").read_text(encoding="utf-8"))
        candidates.append(manifest.get("tokenizer", {}).get("path", ""))
    for candidate in candidates:
        if candidate:
            if not Path(candidate).exists():
                raise ConfigError(f"[eval] tokenizer {candidate}: no such file (set eval.tokenizer)")
            return Path(candidate)
    raise ConfigError("[eval] needs a tokenizer for the task texts: set eval.tokenizer (or data.tokenizer) to the "
                      "file the model's token ids come from")


def _live_model(engine: Any) -> Any:
    """The engine's network (``TrainEngine``: ``trained_module.model``; the loop tests' engine: ``model``)."""
    module = getattr(engine, "trained_module", None)
    return module.model if module is not None else engine.model


class LoopEvaluator:
    """See the module docstring. ``cfg``: the run's ``RunConfig``; ``topology``: its ``train.topology.Topology``."""

    def __init__(self, *, cfg: Any, topology: Any) -> None:
        from evaluation.tasks import check_tasks, set_offline, task_manager
        from model.tokenizer import load_tokenizer

        set_offline()
        self.section, self.cfg = cfg.eval, cfg
        self.tokenizer = load_tokenizer(_tokenizer_path(cfg))
        vocab = cfg.model_config().vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ConfigError(f"[eval] tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} ids, the model "
                              f"{vocab}: give the tokenizer the training data was made with")
        self._rendered = tempfile.TemporaryDirectory(prefix="llama-eval-tasks-")
        self.manager = None
        if self.section.tasks:
            self.manager = task_manager(data_dir=self.section.data_dir or None, include_path=self.section.include_path,
                                        rendered_dir=self._rendered.name)
            check_tasks(list(self.section.tasks), manager=self.manager)
        self.documents = self._perplexity_documents()
        groups = EvalGroups.from_topology(topology) if hasattr(topology, "dp_group") else EvalGroups()
        self.groups = groups

    def _perplexity_documents(self) -> list[Any]:
        if not self.section.perplexity_data:
            return []
        from evaluation.perplexity import read_documents

        path = Path(self.section.perplexity_data)
        try:
            documents = list(read_documents(path, split=self.section.perplexity_split, text_field="text",
                                            tokenizer=self.tokenizer))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"eval.perplexity_data={path}: {err}") from None
        if not documents:
            raise ConfigError(f"eval.perplexity_data={path}: no documents")
        return documents[: self.section.perplexity_docs]

    def evaluate(self, engine: Any, *, step: int) -> dict[str, float]:
        """Every configured task and the perplexity, on the live model; collective (all ranks, same answers)."""
        from evaluation.adapter import LlamaLM
        from evaluation.scoring import LlamaRunner

        model = _live_model(engine)
        was_training = model.training
        model.eval()
        try:
            runner = LlamaRunner(model, groups=self.groups)  # window: the model's max_seq_len, as lm-eval's hf
            metrics: dict[str, float] = {}
            if self.manager is not None:
                lm = LlamaLM(runner, self.tokenizer, batch_size=self.section.batch_size)
                metrics.update(self._task_metrics(lm))
            if self.documents:
                metrics.update(self._perplexity(runner))
        finally:
            model.train(was_training)
        return metrics

    def _task_metrics(self, lm: Any) -> dict[str, float]:
        from evaluation.cli import evaluate_tasks

        results = evaluate_tasks(lm, list(self.section.tasks), manager=self.manager, limit=self.section.limit,
                                 num_fewshot=None, log_samples=False, bootstrap_iters=0, seed=self.cfg.train.seed)
        out = {}
        for task, values in results["results"].items():
            for key, value in values.items():
                metric, _, filt = key.partition(",")
                if filt and "stderr" not in metric and isinstance(value, (int, float)):
                    out[f"eval/{task}/{metric}"] = float(value)
        return out

    def _perplexity(self, runner: Any) -> dict[str, float]:
        from evaluation.perplexity import document_perplexity

        result = document_perplexity(runner, self.tokenizer, self.documents, batch_size=self.section.batch_size)
        return {f"eval/perplexity/{k}": float(result[k])
                for k in ("bits_per_byte", "token_perplexity", "word_perplexity", "byte_perplexity")}
