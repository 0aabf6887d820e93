"""Context-parallel chunking (model/context_parallel.py) in one process: which tokens a CP rank holds."""

from __future__ import annotations

import pytest
import torch

from model.context_parallel import ContextParallel, chunk_order, rank_positions

pytestmark = pytest.mark.timeout(60)


def test_rank_holds_chunk_i_and_its_mirror() -> None:
    assert rank_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert rank_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert chunk_order(2) == [0, 3, 1, 2]
    every = torch.cat([rank_positions(96, 4, r) for r in range(4)])
    assert sorted(every.tolist()) == list(range(96))  # each token on exactly one rank
    # Load balance under the causal mask: every rank's queries see the same number of keys.
    work = {r: int((rank_positions(96, 4, r) + 1).sum()) for r in range(4)}
    assert len(set(work.values())) == 1


def test_sequence_must_split_into_2cp_chunks() -> None:
    with pytest.raises(ValueError, match=r"not divisible by 2 x CP = 8.*train.seq_len"):
        rank_positions(100, 4, 0)


def test_cp1_is_the_identity() -> None:
    cp = ContextParallel(None)
    tokens = torch.arange(12).view(2, 6)
    assert not cp.enabled and torch.equal(cp.shard(tokens), tokens)
    assert cp.positions(6).tolist() == [list(range(6))]


def test_config_refuses_what_context_parallelism_cannot_run() -> None:
    from train.config import ConfigError, RunConfig

    base = ["--model.name=debug_tiny", "--data.synthetic=true", "--train.global_batch_size=8",
            "--train.micro_batch_size=2"]
    RunConfig.from_toml(None, [*base, "--data.seq_len=64", "--parallel.cp=4"]).validate(world_size=4)
    with pytest.raises(ConfigError, match=r"data.seq_len=60 is not divisible by 2 x parallel.cp = 8"):
        RunConfig.from_toml(None, [*base, "--data.seq_len=60", "--parallel.cp=4"]).validate()
    RunConfig.from_toml(None, [*base, "--data.seq_len=64", "--parallel.cp=2", "--parallel.pp=2"]).validate(
        world_size=4)
    with pytest.raises(ConfigError, match=r"parallel.tp=1, pp=1, cp=0: must be >= 1"):
        RunConfig.from_toml(None, [*base, "--data.seq_len=64", "--parallel.cp=0"]).validate()
    with pytest.raises(ConfigError, match=r"world size 6 is not a multiple of tp x pp x cp"):
        RunConfig.from_toml(None, [*base, "--data.seq_len=64", "--parallel.cp=4"]).validate(world_size=6)


def test_config_refuses_sequence_parallelism_it_cannot_run() -> None:
    from train.config import ConfigError, RunConfig

    base = ["--model.name=debug_tiny", "--data.synthetic=true", "--data.seq_len=64",
            "--parallel.sequence_parallel=true"]
    RunConfig.from_toml(None, [*base, "--parallel.tp=2"]).validate(world_size=2)
    with pytest.raises(ConfigError, match=r"sequence_parallel=true with parallel.tp=1"):
        RunConfig.from_toml(None, base).validate()
    # SP combines with CP and PP now; each rank's CP share of the sequence must split over TP.
    RunConfig.from_toml(None, [*base, "--parallel.tp=2", "--parallel.cp=2", "--parallel.pp=2"]).validate(world_size=8)
    with pytest.raises(ConfigError, match=r"data.seq_len=66 is not divisible by parallel.tp x cp = 4"):
        RunConfig.from_toml(None, [*base, "--parallel.tp=4", "--data.seq_len=66"]).validate()
    with pytest.raises(ConfigError, match=r"data.seq_len=68 is not divisible by parallel.tp x cp = 8"):
        RunConfig.from_toml(None, [*base, "--parallel.tp=4", "--parallel.cp=2", "--data.seq_len=68"]).validate()
    # Unset (the default) is never an error: the engine turns it off where it cannot run.
    unset = [b for b in base if "sequence_parallel" not in b]
    RunConfig.from_toml(None, [*unset, "--parallel.tp=4", "--data.seq_len=66"]).validate()


def test_engine_refuses_cp_for_other_objectives_and_stages() -> None:
    from types import SimpleNamespace

    from train.config import ConfigError, EngineConfig, ParallelSection
    from train.objective import LanguageModelObjective
    from train.parallelize import context_parallel

    cfg = EngineConfig(global_batch_size=8, micro_batch_size=2, parallel=ParallelSection(cp=2))
    cp1 = SimpleNamespace(cp_size=1, pp_size=1, cp_group=None)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 but this stage runs a topology of cp 1"):
        context_parallel(cfg, topology=cp1, objective=LanguageModelObjective())

    class ScalarHead(LanguageModelObjective):
        pass

    cp2 = SimpleNamespace(cp_size=2, pp_size=1, cp_group=object())
    with pytest.raises(ConfigError, match=r"language-model objective.*ScalarHead"):
        context_parallel(cfg, topology=cp2, objective=ScalarHead())


def test_sequence_parallel_default_resolves_per_run() -> None:
    """Unset: on at tp > 1 for language-model, reward-model, DPO and distillation training (LM, DPO and
    distillation with PP too, LM with CP), off with one line naming why where it cannot run; explicit true there is an error; false is off."""
    import dataclasses
    from types import SimpleNamespace

    from model.config import get_config
    from rlhf.distill.train import DistillObjective
    from rlhf.dpo.model import DPOObjective
    from rlhf.reward.model import RewardObjective
    from train.config import ConfigError, EngineConfig, ParallelSection
    from train.objective import LanguageModelObjective
    from train.parallelize import resolve_sequence_parallel

    model = get_config("debug_tiny")
    lm = LanguageModelObjective()

    def resolve(*, tp=2, cp=1, pp=1, sp=None, seq_len=64, objective=lm, cfg_model=model, lora=None):
        lines: list[str] = []
        cfg = EngineConfig(global_batch_size=8, micro_batch_size=2, seq_len=seq_len, lora=lora,
                           parallel=ParallelSection(tp=tp, cp=cp, pp=pp, sequence_parallel=sp))
        topo = SimpleNamespace(tp_size=tp, cp_size=cp, pp_size=pp, global_rank=0)
        on = resolve_sequence_parallel(cfg_model, cfg, topology=topo, objective=objective,
                                       print_fn=lambda line, **k: lines.append(line))
        return on, lines

    assert resolve() == (True, [])
    assert resolve(cp=2, pp=2) == (True, [])
    assert resolve(tp=1) == (False, [])
    assert resolve(sp=False) == (False, [])
    # The reward model and DPO run it, on varying lengths too (the engine pads their sequence_keys), LoRA as well.
    rm, dpo = RewardObjective.__new__(RewardObjective), DPOObjective.__new__(DPOObjective)
    assert resolve(objective=rm, seq_len=0) == (True, []) and resolve(objective=dpo, seq_len=0) == (True, [])
    assert resolve(lora=object()) == (True, [])
    # On pipeline stages too: the last stage's DPO / distillation loss reads the head stage's gathered logits.
    distill = DistillObjective.__new__(DistillObjective)
    assert resolve(pp=2, objective=dpo, seq_len=0) == (True, []) and resolve(pp=2, objective=distill) == (True, [])

    class Unsupported:  # an objective that does not declare it
        pass

    on, lines = resolve(objective=Unsupported())
    assert not on and lines == ["sequence parallelism off (tp 2): the Unsupported objective runs without it "
                                "(language-model, reward-model, DPO, PPO and distillation training run it)"]
    assert resolve(cp=3, seq_len=70)[1] == ["sequence parallelism off (tp 2): seq_len=70 is not divisible by "
                                            "tp x cp = 6"]
    no_keys = SimpleNamespace(supports_sequence_parallel=True)  # varying lengths and nothing it lets the engine pad
    assert "vary in length" in resolve(seq_len=0, objective=no_keys)[1][0]
    assert "n_kv_heads=1" in resolve(cfg_model=dataclasses.replace(model, n_kv_heads=1))[1][0]
    with pytest.raises(ConfigError, match=r"sequence_parallel=true cannot run here: the Unsupported"):
        resolve(sp=True, objective=Unsupported())
    with pytest.raises(ConfigError, match=r"sequence_parallel=true cannot run here: parallel.tp=1"):
        resolve(sp=True, tp=1)
    assert resolve(sp=True, seq_len=0) == (True, [])  # varying lengths: the engine pads each batch to a multiple


def test_sequence_parallel_pads_varying_lengths_to_a_multiple_of_tp() -> None:
    """The engine pads an objective's [b, s] ``sequence_keys`` with zeros (masked positions) to a multiple of TP;
    other fields (per-row scores, indices) and lengths TP divides pass unchanged."""
    from train.parallelize import pad_sequence_keys

    batch = {"input_ids": torch.arange(1, 8).view(1, 7), "loss_mask": torch.ones(1, 7),
             "teacher_values": torch.ones(1, 7, 3), "score_index": torch.tensor([6]), "ref": torch.ones(1, 7)}
    padded = pad_sequence_keys(batch, ("input_ids", "loss_mask", "teacher_values"), 4)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert padded["loss_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]
    assert padded["teacher_values"].shape == (1, 8, 3) and padded["teacher_values"][0, 7].tolist() == [0, 0, 0]
    assert padded["score_index"] is batch["score_index"] and padded["ref"] is batch["ref"]  # not named: unchanged
    assert pad_sequence_keys(padded, ("input_ids",), 2) is padded
