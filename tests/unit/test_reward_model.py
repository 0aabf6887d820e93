"""Reward model pieces against hand-computed references: the scalar head and its loss, score position and
padding, save/load, the scorer, evaluation metrics, best-of-K statistics and rejection-sampling selection."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import get_config
from model.layers import LocalLayers
from model.llama import Llama, init_llama_weights
from rlhf.data import PreferencePair, read_dialogues_jsonl
from rlhf.losses import ranking_loss
from rlhf.rejection_sampling import best_of_k_curve, score_answers, write_outputs
from rlhf.reward.evaluate import length_baseline, pair_accuracy, summarize
from rlhf.reward.model import RewardModel, RewardObjective, load_reward_model
from rlhf.scalar_head import save_scalar_model as save_reward_model
from rlhf.sources import Prompt

pytestmark = pytest.mark.timeout(60)
CFG = get_config("debug_tiny")


def _model(seed: int = 0) -> RewardModel:
    rm = RewardObjective().wrap(Llama(CFG), layers=LocalLayers())
    init_llama_weights(rm, seed=seed, n_layers=CFG.n_layers, native_name=RewardObjective().native_name)
    return rm.eval()


def test_ranking_loss_per_pair_terms() -> None:
    terms = ranking_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5]), torch.tensor([1 / 3, 0.0]),
                         reduction="none")
    expected = [math.log1p(math.exp(-(1 - 1 / 3))), math.log1p(math.exp(1.0))]
    assert terms.tolist() == pytest.approx(expected, abs=1e-6)
    assert float(ranking_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5]), torch.tensor([1 / 3, 0.0]))) == (
        pytest.approx(sum(expected) / 2, abs=1e-6))
    with pytest.raises(ValueError, match="reduction='sum'"):
        ranking_loss(torch.zeros(1), torch.zeros(1), reduction="sum")


def test_reward_model_has_no_lm_head_and_native_names() -> None:
    rm = _model()
    names = {RewardObjective().native_name(n) for n, _ in rm.named_parameters()}
    assert "reward_head.weight" in names and "output.weight" not in names and "tok_embeddings.weight" in names
    assert rm.reward_head.weight.shape == (1, CFG.dim)


@torch.no_grad()
def test_scores_at_the_index_unchanged_by_right_padding_and_loss_is_the_margin_ranking_sum() -> None:
    rm = _model()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in (7, 12, 9, 5)]
    alone = torch.stack([rm.scores(s[None], torch.tensor([len(s) - 1]))[0] for s in seqs])
    padded = torch.zeros(4, 16, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    where = torch.tensor([len(s) - 1 for s in seqs])
    batched = rm(padded, where)
    assert torch.allclose(batched, alone, atol=1e-5)
    # Hand-made reference: the final-norm hidden state at the index, through the head.
    hidden = rm.model(padded, return_hidden=True)[torch.arange(4), where]
    assert torch.allclose(batched, hidden @ rm.reward_head.weight[0], atol=1e-6)
    margin, weight = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    loss = rm(padded, where, margin, weight, torch.tensor(0.5))
    rc, rr = batched[:2], batched[2:]
    assert float(loss) == pytest.approx(float(-F.logsigmoid(rc - rr - margin).sum() * 0.5), abs=1e-5)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    rm = _model(seed=3)
    state = {RewardObjective().native_name(k): v for k, v in rm.named_parameters()}
    save_reward_model(state, CFG, tmp_path / "rm", meta={"tokenizer": "t", "template": "llama2", "max_len": 64,
                                                        "split": {"valid_fraction": 0.1, "seed": "s"}})
    loaded, meta = load_reward_model(tmp_path / "rm")
    x, where = torch.randint(3, 300, (2, 10)), torch.tensor([9, 4])
    assert torch.equal(loaded.scores(x, where), rm.scores(x, where)) and meta["max_len"] == 64
    with pytest.raises(ValueError, match="no reward_model.json; expected a reward model exported"):
        load_reward_model(tmp_path)
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps({**meta, "format": "llama-native"}))
    with pytest.raises(ValueError, match="format 'llama-native', expected 'llama-reward-model'"):
        load_reward_model(tmp_path / "rm")
    with pytest.raises(ValueError, match="has no 'reward_head.weight'"):
        save_reward_model({k: v for k, v in state.items() if k != "reward_head.weight"}, CFG, tmp_path / "x",
                          meta={})


def test_scorer_keeps_input_order(tmp_path: Path) -> None:
    from model.tokenizer import load_tokenizer
    from rlhf.reward.scorer import RewardScorer
    from rlhf.synthetic import synthetic_tokenizer

    tok = load_tokenizer(synthetic_tokenizer(tmp_path / "tok"))
    scorer = RewardScorer(_model(), tok, template="llama2", max_len=64, batch_size=3)
    prompts = [[{"role": "user", "content": "tell me about the river" + " stone" * i}] for i in range(7)]
    answers = ["sunny" * (7 - i) for i in range(7)]
    together = scorer.score(prompts, answers)
    one_by_one = torch.cat([scorer.score([p], [a]) for p, a in zip(prompts, answers)])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def _pair(chosen: str, rejected: str, rating: str | None = None) -> PreferencePair:
    return PreferencePair(prompt=[{"role": "user", "content": "q"}], chosen=chosen, rejected=rejected,
                          rating=rating, is_safety=False, source="t", id=chosen)


def test_accuracy_length_baseline_and_rating_buckets() -> None:
    assert pair_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.625
    pairs = [_pair("long answer", "short", "better"), _pair("a", "bb", "better"), _pair("cc", "dd", "unsure")]
    assert length_baseline(pairs) == pytest.approx((1 + 0 + 0.5) / 3)
    out = summarize(pairs, torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["mean_margin"] == pytest.approx(1 / 3)
    assert out["per_rating"]["better"] == {"pairs": 2, "accuracy": 0.5, "mean_margin": 0.0, "length_baseline": 0.5}
    assert list(out["per_rating"]) == ["better", "unsure"]


def test_best_of_k_curve_and_combined_selection() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]])
    assert best_of_k_curve(scores) == [0.5, 1.5, 3.5]

    class Fixed:
        def __init__(self, values: list[float]) -> None:
            self.values = torch.tensor(values)

        def score(self, turns, answers, systems):
            return self.values

    prompts = [Prompt([{"role": "user", "content": "q"}], None, flag, "t", str(i)) for i, flag in
               enumerate([False, True, False])]
    helpful, safety = [2.0, 2.0, 2.0], [3.0, -1.0, -3.0]  # sigmoid(-3) < 0.15: unsafe answer, safety wins
    out = score_answers({"helpful": Fixed(helpful), "safety": Fixed(safety)}, prompts, ["a", "b", "c"])
    assert out["selection"].tolist() == pytest.approx([2.0, -1.0, -3.0], abs=1e-4)
    assert torch.equal(score_answers({"helpful": Fixed(helpful)}, prompts, ["a"] * 3)["selection"],
                       torch.tensor(helpful))


def test_rejection_sampling_keeps_the_best_over_rounds(tmp_path: Path) -> None:
    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], None, False, "t", f"id{i}") for i in range(3)]
    answers = [["a0", "b0"], ["", "b1"], ["", ""]]
    scores = torch.tensor([[1.0, 2.0], [9.0, 0.5], [5.0, 6.0]])
    scored = {"helpful": scores.flatten(), "selection": scores.flatten()}
    previous = {"id0": {"answer": "old0", "round": 1}, "id2": {"answer": "old2", "round": 1}}
    args = Namespace(out=str(tmp_path), k=2, round=2, temperature=1.0, top_p=1.0, split="valid",
                     reward_model="rm", safety_reward_model="", previous=["r1"])
    report = write_outputs(args, prompts, answers, scored, scores, previous, {"id0": 3.0, "id2": -1.0})
    best = {d.id: d.messages[-1]["content"] for d in read_dialogues_jsonl(tmp_path / "best.jsonl")[0]}
    # id0: the earlier round's answer scores higher; id1: the empty sample (9.0) is never kept; id2: all new
    # samples are empty, so the earlier round's answer stays.
    assert best == {"id0": "old0", "id1": "b1", "id2": "old2"}
    assert report["best_from_previous_rounds"] == 2 and report["best_sample_empty"] == 2
    assert report["mean_best_of_k"] == pytest.approx((2 + 9 + 6) / 3)
    assert report["mean_single_sample"] == pytest.approx(float(scores.mean()))
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 6


def test_reference_engine_normalises_by_the_global_number_of_pairs() -> None:
    from rlhf.reward.config import RewardConfig
    from train.reference import ReferenceEngine

    cfg = RewardConfig.from_toml(None, ["--train.global_batch_size=4", "--train.micro_batch_size=2",
                                        "--optim.grad_clip=0"])
    engine = ReferenceEngine(model_cfg=CFG, engine_cfg=cfg.engine_config(), objective=RewardObjective())
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 300, (4, 8), generator=g), "score_index": torch.tensor([7, 5, 6, 7]),
                "margin": torch.tensor([0.0, 1.0]), "pair_weight": torch.ones(2)} for _ in range(2)]
    with torch.no_grad():
        terms = [ranking_loss(*engine.module(b["input_ids"], b["score_index"]).split(2), b["margin"],
                              reduction="none") for b in batches]
    result = engine.train_step(iter(batches), lr=0.0)
    assert result.loss == pytest.approx(float(torch.cat(terms).mean()), abs=1e-6) and result.tokens == 4


def test_load_reads_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-process scorer's whole load is the module plus one tensor: each tensor read from the file is
    copied in and dropped before the next is read (no state dict of the whole model beside the module)."""
    import weakref

    import rlhf.scalar_head as scalar_head

    rm = _model(seed=4)
    state = {RewardObjective().native_name(k): v for k, v in rm.named_parameters()}
    save_reward_model(state, CFG, tmp_path / "rm", meta={"tokenizer": "t", "template": "llama2", "max_len": 64})
    original, live, most = scalar_head.read_scalar_model, [0], [0]

    def counting(path):
        cfg, reader, meta = original(path)

        class Counting:
            def names(self):
                return reader.names()

            def read(self, name):
                value = reader.read(name)
                live[0] += 1
                most[0] = max(most[0], live[0])
                weakref.finalize(value, lambda: live.__setitem__(0, live[0] - 1))
                return value

        return cfg, Counting(), meta

    monkeypatch.setattr(scalar_head, "read_scalar_model", counting)
    loaded, _ = load_reward_model(tmp_path / "rm")
    assert most[0] == 1 and len(state) > 5
    x, where = torch.randint(3, 300, (2, 10)), torch.tensor([9, 4])
    assert torch.equal(loaded.scores(x, where), rm.scores(x, where))
