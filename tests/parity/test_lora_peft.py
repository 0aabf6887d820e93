"""Our LoRA adapters loaded by ``peft`` itself on our Hugging Face export give our logits (fp32, CPU).

    python -m pytest -q tests/parity/test_lora_peft.py

Ours: a ``Llama`` with trained adapters (``model.lora``). Theirs: ``save_hf`` of the base weights ->
``transformers.LlamaForCausalLM`` -> ``peft.PeftModel.from_pretrained`` on our ``write_peft_adapter`` directory.
The logits agree within 1e-4, before and after peft's own ``merge_and_unload``; and the adapter files a LoRA SFT
run exports (``final_model_lora/``), on the HF export of its initial checkpoint, give its merged ``final_model/``'s.
This is the only module that imports ``peft`` (a [dev] dependency): the repository writes the files itself and
needs no peft at run time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoints.hf import save_hf
from model.checkpoints.lora_adapters import write_peft_adapter
from model.config import get_config
from model.lora import LoRASpec, adapter_state_dict, apply_lora
from tests.unit.test_lora import base_model, train_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.timeout(120)
TOL = 1e-4


def test_peft_loads_our_adapter_on_our_hf_export(tmp_path: Path) -> None:
    cfg = get_config("debug_tiny")
    base_state = {n: t.clone() for n, t in base_model().state_dict().items()}
    save_hf(base_state, cfg, tmp_path / "hf")
    model = base_model()
    spec = LoRASpec(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    apply_lora(model, spec, seed=6)
    train_adapters(model, steps=3)
    write_peft_adapter(adapter_state_dict(model), spec, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(tokens)
        theirs = peft_model(input_ids=tokens).logits
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)(
            input_ids=tokens).logits
        merged = peft_model.merge_and_unload()(input_ids=tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"ours vs peft on our HF export: max |logit diff| = {diff:.2e}")
    assert (theirs - base).abs().max().item() > 1e-3  # peft did apply the adapters
    assert diff <= TOL
    assert (ours - merged).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peft_loads_a_training_runs_export(tmp_path: Path) -> None:
    """The files a LoRA SFT run exports (``final_model_lora/``), loaded by ``peft`` on the HF export of the run's
    initial checkpoint, give the logits of the run's merged ``final_model/`` within 1e-4."""
    from model.checkpoints import from_pretrained
    from tests.distributed.rlhf_parity_config import make_parity_data, rlhf_parity_config, run_stage_config
    from train.reference import ReferenceEngine, single_process_topology

    data = make_parity_data(tmp_path / "data")
    run = tmp_path / "run"
    cfg = rlhf_parity_config("sft", data, ["--lora.rank=4", "--lora.alpha=8", "--lora.targets=q,k,v,o,gate,up,down",
                                           "--optim.lr=1e-2", f"--run.dir={run}"])
    run_stage_config("sft", cfg, engine_factory=ReferenceEngine, topology_factory=single_process_topology)
    init = from_pretrained(data / "init")
    save_hf({n: t.clone() for n, t in init.state_dict().items()}, init.config, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_model, run / "final_model_lora").eval()
    tokens = torch.randint(0, init.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = from_pretrained(run / "final_model")(tokens)
        theirs = peft_model(input_ids=tokens).logits
        base = init(tokens)
    assert (ours - base).abs().max().item() > 1e-3  # the run did train the adapters
    diff = (ours - theirs).abs().max().item()
    print(f"run's merged model vs peft on its adapter export: max |logit diff| = {diff:.2e}")
    assert diff <= TOL
