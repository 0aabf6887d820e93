"""Unit tests of the PPO stage's pieces against hand-computed values (run: ``pytest tests/unit/test_ppo.py``).

Rewards (programmatic scorers, Llama 2's gate, WHITEN(LOGIT) over the batch), global whitening, the per-token
KL penalty variants, the policy/value modules' losses, rollout collation and per-row seeds, prompt order and
DP shards, the config defaults of REFERENCE.md, and the guards. Expected numbers are written out or computed
with ``math``; the losses themselves are covered in ``tests/unit/test_losses.py``.
"""

from __future__ import annotations

import inspect
import math
import statistics
from pathlib import Path

import pytest
import torch

from model.config import get_config
from model.llama import Llama, init_llama_weights
from rlhf import losses
from rlhf.ppo.config import PPOConfig, default_beta
from rlhf.ppo.guards import EarlyStopping, NonFinitePPO, PPOGuards
from rlhf.ppo.prompts import SAFETY_MARKER, iteration_prompts, shard, split_heldout, synthetic_prompts
from rlhf.ppo.rewards import (
    AvoidTokenScorer,
    ConstantScorer,
    RewardStage,
    TargetTokenScorer,
    build_scorer,
    global_masked_whiten,
)
from rlhf.ppo.roles import PolicyModule, ValueModel, vocab_parallel_entropy
from rlhf.ppo.rollout import Prompt, Sample, answer_slices, collate, padded, sample_rollouts
from rlhf.scalar_head import zero_head

pytestmark = pytest.mark.timeout(120)


def close(actual: torch.Tensor | float | list, expected: float | list, tol: float = 1e-5) -> None:
    a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.allclose(a, e, atol=tol, rtol=0), (a.tolist(), e.tolist())


def sample(prompt: list[int], answer: list[int], *, is_safety: bool = False, index: int = 0) -> Sample:
    return Sample(prompt=Prompt(index=index, ids=tuple(prompt), is_safety=is_safety), answer=answer, truncated=False)


# ----------------------------------------------------------------------------------------------- rewards


def test_programmatic_scorers() -> None:
    s = TargetTokenScorer([5, 6])
    # (hits + 1) / (len + 2): [5, 7, 6] -> 3/5; [] -> 1/2; [7] -> 1/3
    close(s([[1]] * 3, [[5, 7, 6], [], [7]]), [3 / 5, 1 / 2, 1 / 3])
    close(AvoidTokenScorer([9])([[1]], [[9, 9, 1]]), [1 - 3 / 5])
    close(ConstantScorer(0.25)([[1], [1]], [[2], [3]]), [0.25, 0.25])
    assert isinstance(build_scorer("target_tokens:5,6"), TargetTokenScorer)
    assert isinstance(build_scorer("avoid_tokens:9"), AvoidTokenScorer)
    assert build_scorer("constant:0.7").value == 0.7
    assert build_scorer("tests.unit.test_ppo:make_scorer").outputs == "logit"
    with pytest.raises(ValueError, match="keyword.*data.tokenizer"):
        build_scorer("keyword:hello")
    with pytest.raises(ValueError, match="give token ids"):
        build_scorer("target_tokens:")
    with pytest.raises(ValueError, match="use target_tokens"):
        build_scorer("nonsense")


class _LogitScorer:
    outputs = "logit"

    def __call__(self, prompts: list, answers: list) -> torch.Tensor:
        return torch.tensor([math.log(0.9 / 0.1)] * len(answers))  # sigmoid -> 0.9


def make_scorer(**_: object) -> _LogitScorer:
    return _LogitScorer()


def test_reward_stage_llama2_gating_logit_whiten() -> None:
    """Rc = Rs if is_safety(p) or Rs < 0.15 else Rh; then LOGIT; then WHITEN (unbiased) over the batch."""

    class Fixed:
        outputs = "probability"

        def __init__(self, values: list[float]) -> None:
            self.values = values

        def __call__(self, prompts: list, answers: list) -> torch.Tensor:
            return torch.tensor(self.values)

    samples = [sample([1], [4], is_safety=f) for f in (False, False, True, True, False)]
    helpful, safety = Fixed([0.9, 0.9, 0.9, 0.2, 0.6]), Fixed([0.5, 0.1, 0.5, 0.1, 0.15])
    out = RewardStage(helpful=helpful, safety=safety, whiten=False)(samples)
    # safe answer to a normal prompt -> Rh; Rs < 0.15 -> Rs; safety prompts -> Rs; Rs == 0.15 is not < 0.15.
    close(out.combined, [0.9, 0.1, 0.5, 0.1, 0.6])
    assert out.used_safety.tolist() == [False, True, True, True, False]
    raw = [math.log(9), math.log(1 / 9), 0.0, math.log(1 / 9), math.log(0.6 / 0.4)]
    close(out.score, raw)
    whitened = RewardStage(helpful=helpful, safety=safety)(samples).score
    mu, sd = statistics.mean(raw), statistics.stdev(raw)
    close(whitened, [(v - mu) / sd for v in raw], tol=1e-4)
    # "single": the helpfulness scorer alone; raw RM logits go through sigmoid before LOGIT (identity here).
    single = RewardStage(helpful=_LogitScorer(), kind="single", whiten=False)(samples[:2])
    close(single.score, [math.log(9), math.log(9)], tol=1e-4)
    close(single.helpful, [0.9, 0.9])
    # No safety scorer: a constant 1.0, so nothing is gated on normal prompts.
    none = RewardStage(helpful=Fixed([0.3, 0.3]), whiten=False)(samples[:2])
    close(none.combined, [0.3, 0.3])


def test_global_masked_whiten_matches_losses() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(global_masked_whiten(x, mask), losses.masked_whiten(x, mask))
    close(global_masked_whiten(torch.tensor([1.0, 3.0])), [-1 / math.sqrt(2), 1 / math.sqrt(2)], tol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        global_masked_whiten(torch.tensor([1.0]))


def test_kl_penalty_estimators() -> None:
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    beta = 0.1
    k1 = losses.kl_penalized_rewards(torch.tensor([1.0]), logp, ref, mask, beta)
    close(k1, [[-0.05, 0.1 + 1.0, 0.0]])
    # k3 = (r - 1) - log r with log r = ref - logp: token 0: e^-0.5 - 1 + 0.5; token 1: e^1 - 1 - 1.
    k3 = losses.kl_penalized_rewards(torch.tensor([1.0]), logp, ref, mask, beta, kind="k3")
    close(k3, [[-beta * (math.exp(-0.5) - 0.5), -beta * (math.e - 2) + 1.0, 0.0]])
    k2 = losses.kl_penalized_rewards(torch.tensor([0.0]), logp, ref, mask, beta, kind="k2")
    close(k2, [[-beta * 0.125, -beta * 0.5, 0.0]])


def test_loss_defaults_are_llama2() -> None:
    assert inspect.signature(losses.policy_loss).parameters["clip"].default == 0.2
    assert inspect.signature(losses.value_loss).parameters["clip"].default == 0.2
    assert inspect.signature(losses.combined_reward).parameters["threshold"].default == 0.15
    assert inspect.signature(losses.llama2_ppo_reward).parameters["threshold"].default == 0.15


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_are_llama2() -> None:
    cfg = PPOConfig()
    o, p = cfg.optim, cfg.ppo
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (1e-6, 0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (p.prompts_per_iteration, cfg.train.global_batch_size, p.clip, p.value_clip) == (512, 64, 0.2, 0.2)
    assert cfg.reward.safety_threshold == 0.15 and cfg.reward.kind == "llama2" and cfg.reward.whiten
    for name, beta in (("llama2_7b", 0.01), ("llama2_13b", 0.01), ("llama2_34b", 0.005), ("llama2_70b", 0.005)):
        assert default_beta(get_config(name).num_params()) == beta, name
        assert PPOConfig.from_toml(None, [f"--model.name={name}"]).beta == beta
    assert PPOConfig.from_toml(None, ["--reward.beta=0.2"]).beta == 0.2
    run = cfg.engine_config(role="policy")
    assert (run.global_batch_size, run.optim.lr, run.optim.min_lr_ratio, run.optim.warmup_steps) == (
        64, 1e-6, 1.0, 0)
    assert PPOConfig.from_toml(None, ["--ppo.value_lr=3e-6"]).engine_config(role="value").optim.lr == 3e-6


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'lrr' in \[optim\]"):
        PPOConfig.from_toml(None, ["--optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown section"):
        PPOConfig.from_toml(None, ["--nope.x=1"])
    with pytest.raises(ValueError, match="reward.helpful is empty"):
        PPOConfig().validate()
    ok = ["--reward.helpful=constant:0.5"]
    with pytest.raises(ValueError, match="not a multiple of train.global_batch_size"):
        PPOConfig.from_toml(None, ok + ["--ppo.prompts_per_iteration=100"]).validate()
    with pytest.raises(ValueError, match="micro_batch_size x dp"):
        PPOConfig.from_toml(None, ok + ["--train.global_batch_size=8", "--train.micro_batch_size=8",
                                        "--ppo.prompts_per_iteration=64"]).validate(world_size=2)
    with pytest.raises(ValueError, match="rollout.gather"):
        PPOConfig.from_toml(None, ok + ["--rollout.gather=sometimes"]).validate()
    text = PPOConfig.from_toml(None, ok + ["--model.overrides.vocab_size=1024"]).to_toml()
    assert "helpful = \"constant:0.5\"" in text and "vocab_size = 1024" in text
    with pytest.raises(ValueError, match="offload_frozen=true needs the frozen roles at ZeRO stage 3.*"
                                         "--ppo.frozen_zero_stage=3"):
        PPOConfig.from_toml(None, ok + ["--ppo.offload_frozen=true"]).validate()
    offload = PPOConfig.from_toml(None, ok + ["--ppo.offload_frozen=true", "--ppo.frozen_zero_stage=3"]).validate()
    assert offload.engine_config(role="frozen").offload_params and offload.engine_config(role="frozen").zero.stage == 3
    assert not offload.engine_config(role="policy").offload_params  # only the frozen roles are offloaded


# ---------------------------------------------------------------------------------------- prompts, shards


def test_prompt_order_and_shards_union_is_the_single_process_minibatch() -> None:
    prompts = synthetic_prompts(n=40, vocab_size=100, min_len=3, max_len=6, seed=0, safety_fraction=0.5)
    assert all((p.ids[1] == SAFETY_MARKER) == p.is_safety for p in prompts)
    assert all(SAFETY_MARKER not in p.ids[2:] for p in prompts)
    train, held = split_heldout(prompts, n=8)
    assert len(held) == 8 and len(train) == 32 and not {p.index for p in held} & {p.index for p in train}
    assert split_heldout(list(reversed(prompts)), n=8)[1] == list(reversed(held))  # by hash, not by position
    batch = iteration_prompts(train, iteration=1, n=16, seed=3)
    assert batch == iteration_prompts(train, iteration=1, n=16, seed=3)
    epoch = iteration_prompts(train, iteration=0, n=16, seed=3) + batch
    assert sorted(p.index for p in epoch) == sorted(p.index for p in train)  # two iterations = one epoch
    minibatch, dp = 8, 2
    shards = [shard(batch, dp_rank=r, dp_size=dp) for r in range(dp)]
    for k in range(len(batch) // minibatch):
        pieces = [s[k * minibatch // dp : (k + 1) * minibatch // dp] for s in shards]
        assert sorted(p.index for piece in pieces for p in piece) == sorted(
            p.index for p in batch[k * minibatch : (k + 1) * minibatch])
    with pytest.raises(ValueError, match="evenly"):
        shard(batch[:5], dp_rank=0, dp_size=2)


# ------------------------------------------------------------------------------------------------ rollouts


def test_collate_token_layout() -> None:
    s = [sample([1, 7, 8], [20, 21, 2]), sample([1, 9], [30])]
    b = collate(s, pad_id=0, per_token={"adv": [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.9])]})
    # full rows: [1, 7, 8, 20, 21, 2] and [1, 9, 30, 0, 0, 0]; inputs drop the last token, labels the first.
    assert b["input_ids"].tolist() == [[1, 7, 8, 20, 21], [1, 9, 30, 0, 0]]
    assert b["labels"].tolist() == [[7, 8, 20, 21, 2], [9, 30, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    close(b["adv"], [[0, 0, 0.1, 0.2, 0.3], [0, 0.9, 0, 0, 0]])
    back = answer_slices(s, b["adv"])
    close(back[0], [0.1, 0.2, 0.3])
    close(back[1], [0.9])
    values, mask = padded(back)
    close(values, [[0.1, 0.2, 0.3], [0.9, 0, 0]])
    close(mask, [[1, 1, 1], [1, 0, 0]])


@pytest.fixture(scope="module")
def tiny_model() -> Llama:
    model = Llama(get_config("debug_tiny"))
    init_llama_weights(model, seed=3)
    return model.eval()


def test_rollouts_per_row_seeds_are_batch_independent(tiny_model: Llama) -> None:
    prompts = [Prompt(index=i, ids=tuple([1] + list(range(10 + i, 14 + 2 * i)))) for i in range(4)]
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, stop_ids=(2,), pad_id=0)
    together = sample_rollouts(tiny_model, tiny_model.output, prompts, seeds=[5, 6, 7, 8], batch_size=4, **kwargs)
    alone = [sample_rollouts(tiny_model, tiny_model.output, [p], seeds=[s], batch_size=1, **kwargs)[0]
             for p, s in zip(prompts, [5, 6, 7, 8])]
    assert [x.answer for x in together] == [x.answer for x in alone]
    other = sample_rollouts(tiny_model, tiny_model.output, prompts, seeds=[9, 6, 7, 8], batch_size=4, **kwargs)
    assert other[0].answer != together[0].answer and other[1].answer == together[1].answer
    # The stop token ends an answer and is kept (an action of the policy); full-length answers are truncated.
    stop = together[0].answer[2]
    cut = sample_rollouts(tiny_model, tiny_model.output, prompts[:1], seeds=[5], batch_size=1,
                          **{**kwargs, "stop_ids": (stop,)})[0]
    assert cut.answer == together[0].answer[: together[0].answer.index(stop) + 1] and not cut.truncated
    assert together[1].truncated and len(together[1].answer) == 6
    fixed = sample_rollouts(tiny_model, tiny_model.output, prompts[:1], seeds=[5], batch_size=1, fixed_steps=True,
                            **{**kwargs, "stop_ids": (stop,)})[0]
    assert fixed.answer == cut.answer  # per-token ZeRO-3 mode: all steps run, the answer is cut the same way


# --------------------------------------------------------------------------------------------- modules


def test_policy_module_loss_is_sum_of_clipped_surrogate(tiny_model: Llama) -> None:
    module = PolicyModule(tiny_model, tp_size=1, tp_group=None, clip=0.2, temperature=1.0)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 0]])
    labels = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 2, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]]).float()
    logp = module(ids, labels)
    logits = tiny_model(ids).detach()
    close(logp.detach(), losses.logprobs_from_logits(logits, labels))
    old = (logp - 0.3 * torch.tensor([[0, 1, -1, 1, 0], [0, 0, 1, 1, 0]])).detach()
    adv = torch.tensor([[0, 1.0, -1.0, 2.0, 0.5], [0, 0, 1.0, -0.5, 0]])
    loss = module(ids, labels, mask, old, adv, torch.tensor(0.5))
    expected, clip_frac, _ = losses.policy_loss(logp, old, adv, mask, clip=0.2)
    close(loss.detach(), float(expected.detach()) * 6 * 0.5)  # token-mean x 6 tokens x scale
    stats = module.stats.pop()
    close(stats["tokens"], 6.0)
    close(stats["clip_fraction"] / 6, float(clip_frac))
    close(stats["entropy"] / 6, float(losses.entropy_from_logits(logits, mask)), tol=1e-4)
    close(vocab_parallel_entropy(logits, tp_size=1)[0, 1:].mean(),
          float(losses.entropy_from_logits(logits[:1], mask[:1])), tol=1e-4)


def test_value_module_and_zero_head() -> None:
    cfg = get_config("debug_tiny")
    model = Llama(cfg)
    init_llama_weights(model, seed=1)
    weights = zero_head(model.state_dict(), dim=cfg.dim)
    assert "output.weight" not in weights and float(weights["reward_head.weight"].abs().sum()) == 0
    module = ValueModel(Llama(cfg), clip=0.2)
    assert not any(n.startswith("model.output") for n, _ in module.named_parameters())
    with torch.no_grad():
        module.reward_head.weight.fill_(0.01)
    ids = torch.tensor([[1, 5, 6, 7]])
    values = module(ids)
    assert values.shape == (1, 4)
    mask, old, ret = torch.tensor([[0, 1, 1, 0]]).float(), torch.zeros(1, 4), torch.ones(1, 4)
    loss = module(ids, mask, old, ret, torch.tensor(1.0))
    close(loss.detach(), float(losses.value_loss(values, old, ret, mask, clip=0.2).detach()) * 2)


# ---------------------------------------------------------------------------------------------- guards


def test_guards_alarms_and_nonfinite_abort() -> None:
    cfg = PPOConfig().guards
    g = PPOGuards(cfg)
    assert g.observe(1, kl=1.0, k1_mean=1.0, reward=0.0) == []
    assert "guards.kl_max" in g.observe(2, kl=cfg.kl_max + 1, k1_mean=1.0, reward=0.0)[0]
    g = PPOGuards(cfg)
    alarms = [g.observe(i, kl=0.1 * i, k1_mean=0.1, reward=0.0) for i in range(cfg.kl_rising_window + 1)]
    assert not any(alarms[:-1]) and "rose" in alarms[-1][0]
    g = PPOGuards(cfg)
    alarms = [g.observe(i, kl=0.0, k1_mean=-0.05, reward=0.0) for i in range(cfg.negative_kl_window)]
    assert "not samples of the policy" in alarms[-1][0] and not alarms[0]
    g = PPOGuards(cfg)
    assert g.observe(0, kl=0.0, k1_mean=0.0, reward=2.0) == [] and g.observe(1, kl=0.0, k1_mean=0.0, reward=-9.0) == []
    g.observe_heldout(0, 2.0)  # the collapse alarm watches the held-out reward, per evaluation
    alarms = [g.observe_heldout(i, 0.0) for i in range(1, cfg.reward_drop_window + 1)]
    assert "reward collapse" in alarms[-1][0] and "held-out LOGIT(Rc)" in alarms[-1][0] and not alarms[0]
    assert g.alarms_total == 1
    g = PPOGuards(cfg)
    for i in range(cfg.max_consecutive_nonfinite - 1):
        assert "skipped" in g.nonfinite(i, what="rewards")
    with pytest.raises(NonFinitePPO, match="in a row"):
        g.nonfinite(9, what="rewards")


def test_early_stopping() -> None:
    s = EarlyStopping(patience=2, min_delta=0.1)
    assert s.update(1.0, iteration=0) and not s.should_stop
    assert not s.update(1.05, iteration=5)  # below min_delta
    assert s.update(1.2, iteration=10) and s.best_iteration == 10
    assert not s.update(1.0, iteration=15) and not s.update(1.1, iteration=20) and s.should_stop
    assert not EarlyStopping(patience=0).should_stop


def test_hh_rlhf_prompts_flag_safety_and_hold_out_the_rm_split(shared_data: Path) -> None:
    from types import SimpleNamespace

    from model.tokenizer import load_tokenizer
    from rlhf.data import read_hh_rlhf, split_by_hash
    from rlhf.ppo.prompts import prompt_set
    from tests.conftest import require_file

    root = shared_data / "preferences" / "hh-rlhf"
    harmless = require_file(root / "harmless-base" / "test.jsonl.gz")
    tok = load_tokenizer(require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model"))
    data = SimpleNamespace(source=str(root), template="llama2", max_tokens=64)
    prompts = prompt_set(data, tokenizer=tok, vocab_size=32000, seed=0, print_fn=lambda *a, **k: None)
    assert 500 < len(prompts) and all(len(p.ids) <= 64 and p.ids[0] == tok.bos_id for p in prompts)
    safety_texts = {p.prompt[-1]["content"] for p in read_hh_rlhf(harmless, is_safety=True)[0]}
    flagged = [p for p in prompts if p.is_safety]
    assert flagged and all(p.text in safety_texts for p in flagged[:50])
    held_side = [p for p in prompts if p.heldout_side]
    assert 0.05 < len(held_side) / len(prompts) < 0.15  # the 10% hash split of rlhf.data
    pairs, _ = read_hh_rlhf(harmless, is_safety=True)
    valid_texts = {p.prompt[-1]["content"] for p in split_by_hash(pairs)[1]}
    assert all(p.text in valid_texts for p in held_side if p.is_safety)
    train, held = split_heldout(prompts, n=16)
    assert all(p.heldout_side for p in held) and len(train) == len(prompts) - 16
