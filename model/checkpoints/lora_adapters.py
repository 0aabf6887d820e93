"""LoRA adapters on disk in the PEFT format, and a reader that merges them into a base checkpoint on the fly.

    from model.checkpoints.lora_adapters import write_peft_adapter, read_peft_adapter, MergedReader
    write_peft_adapter(adapter_state_dict(model), spec, "out/adapter")   # adapter_config.json + adapter_model.safetensors
    spec, adapters = read_peft_adapter("out/adapter")                     # our names, full tensors
    write_checkpoint(MergedReader(open_checkpoint(base), adapters, spec), cfg, "out/merged", format="hf")

The directory is exactly what ``peft`` writes for a ``LlamaForCausalLM`` (``PeftModel.from_pretrained(hf_model,
"out/adapter")`` loads it on our HF export: tests/parity/test_lora_peft.py): tensors named
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (our ``layers.{i}.attention.wq.lora_A.weight``),
the scale ``lora_alpha / r``. It is also the one adapter format of this repository: the training stages export
it and ``python -m rlhf.merge_lora`` reads it. Nothing here imports ``peft`` (the files are JSON + safetensors).

``MergedReader`` is a ``TensorSource``: each ``read(name)`` returns the base tensor, plus ``scale * B A`` for an
adapted projection, so a merge streams one tensor at a time (a 70B base never sits in memory whole).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from model.checkpoints.common import atomic_directory, load_safetensors, read_json, write_json
from model.checkpoints.hf import hf_name, native_name
from model.checkpoints.streaming import TensorSpec, spec_of, write_safetensors
from model.lora import TARGETS, LoRASpec, merged_weight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_ADAPTER = re.compile(r"^(.+)\.(lora_[AB])\.weight$")
_HF_TARGET = {short: short + "_proj" for short in TARGETS}  # q -> q_proj, gate -> gate_proj ...


def peft_name(name: str) -> str:
    """``layers.0.attention.wq.lora_A.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    match = _ADAPTER.match(name)
    if not match:
        raise ValueError(f"{name!r} is not an adapter weight (expected '<layer>.lora_A.weight' or '.lora_B.weight')")
    return PEFT_PREFIX + hf_name(match.group(1) + ".weight").removesuffix(".weight") + f".{match.group(2)}.weight"


def our_adapter_name(name: str, *, source: str | Path) -> str:
    """The inverse of ``peft_name`` (PEFT may also store ``.lora_A.default.weight``; both are accepted)."""
    name = name.replace(".default.weight", ".weight")
    match = _ADAPTER.match(name.removeprefix(PEFT_PREFIX))
    if not name.startswith(PEFT_PREFIX) or not match:
        raise ValueError(f"{source}: tensor {name!r} is not a LoRA weight of a LlamaForCausalLM")
    return native_name(match.group(1) + ".weight", source=source).removesuffix(".weight") + f".{match.group(2)}.weight"


def write_peft_adapter(adapters: Mapping[str, Tensor], spec: LoRASpec, out_dir: str | Path, *,
                       base_model: str = "", overwrite: bool = True) -> Path:
    """Write full adapter tensors (our names) as a PEFT LoRA directory, atomically."""
    names = sorted(adapters, key=_model_order)
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": sorted(_HF_TARGET[t] for t in spec.targets), "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": base_model, "inference_mode": True,
        "init_lora_weights": "gaussian", "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "revision": None,
    }
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        write_json(tmp / ADAPTER_CONFIG, config)
        specs = [spec_of(peft_name(n), adapters[n]) for n in names]
        by_peft = {peft_name(n): n for n in names}
        write_safetensors(tmp / ADAPTER_WEIGHTS, specs, lambda name: adapters[by_peft[name]].contiguous())
    return Path(out_dir)


def read_peft_adapter(directory: str | Path) -> tuple[LoRASpec, dict[str, Tensor]]:
    """``(spec, adapters by our names)`` of a PEFT LoRA directory; errors name the file and the field."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory}: not a LoRA adapter directory (needs {ADAPTER_CONFIG} and "
                                f"{ADAPTER_WEIGHTS}, as written by training with [lora] or by peft's save_pretrained)")
    config = read_json(config_path)
    for key, want in (("peft_type", "LORA"), ("use_dora", False), ("use_rslora", False), ("bias", "none")):
        if config.get(key, want) != want:
            raise ValueError(f"{config_path}: {key}={config.get(key)!r} is not supported (need {want!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{config_path}: a per-layer {key} is not supported; use one r and lora_alpha")
    reverse = {v: k for k, v in _HF_TARGET.items()}
    targets = config.get("target_modules") or []
    unknown = [t for t in targets if t not in reverse]
    if unknown or isinstance(targets, str):
        raise ValueError(f"{config_path}: target_modules={targets!r}: use a list of {sorted(reverse)}")
    spec = LoRASpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout",
                    0.0)), targets=tuple(t for t in TARGETS if _HF_TARGET[t] in targets)).validate()
    weights_path = directory / ADAPTER_WEIGHTS
    adapters = {our_adapter_name(n, source=weights_path): t for n, t in load_safetensors(weights_path).items()}
    return spec, adapters


def _model_order(name: str) -> tuple[int, str]:
    match = re.match(r"^layers\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


class MergedReader:
    """A ``TensorSource`` over ``base`` (a ``WeightReader``) with adapters folded in as each tensor is read."""

    def __init__(self, base: Any, adapters: Mapping[str, Tensor], spec: LoRASpec) -> None:
        self.base, self.spec, self.cfg = base, spec, base.cfg
        self.source = f"{getattr(base, 'source', 'weights')} + LoRA"
        self.layers: dict[str, tuple[Tensor, Tensor]] = {}
        for name in adapters:
            layer = _ADAPTER.match(name).group(1)  # type: ignore[union-attr]
            if layer + ".weight" not in base.names():
                raise ValueError(f"adapter {name!r} has no base tensor {layer}.weight in {self.source}: the adapter "
                                 "was trained on another model")
            self.layers[layer + ".weight"] = (adapters[f"{layer}.lora_A.weight"], adapters[f"{layer}.lora_B.weight"])

    def names(self) -> list[str]:
        return self.base.names()

    def specs(self) -> list[TensorSpec]:
        return self.base.specs()

    def read(self, name: str) -> Tensor:
        tensor = self.base.read(name)
        if name in self.layers:
            lora_a, lora_b = self.layers[name]
            expected = (tensor.shape[0], self.spec.rank, tensor.shape[1])
            if (lora_b.shape[0], lora_a.shape[0], lora_a.shape[1]) != expected:
                raise ValueError(f"adapter for {name}: B {tuple(lora_b.shape)} x A {tuple(lora_a.shape)} does not "
                                 f"fit the base tensor {tuple(tensor.shape)} with r={self.spec.rank}")
            tensor = merged_weight(tensor, lora_a, lora_b, scale=self.spec.scale)
        return tensor

    def read_slice(self, name: str, *, dim: int, start: int, stop: int) -> Tensor:
        return self.read(name).narrow(dim, start, stop - start).clone()



class MergedExport:
    """An engine export (``names``/``full``/``specs``/``source``, see ``train.task.exported_weights``) of a model
    trained with LoRA, seen as the merged model: adapter tensors are hidden and folded into their layers.
    ``adapters`` keeps them (full tensors, our names) for ``write_peft_adapter``."""

    def __init__(self, weights: Any, spec: LoRASpec) -> None:
        self.weights, self.spec = weights, spec
        self.adapters = {n: weights.full(n) for n in weights.names() if _ADAPTER.match(n)}

    def names(self) -> list[str]:
        return [n for n in self.weights.names() if n not in self.adapters]

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.weights.full_shape(name)

    def full(self, name: str, key: str = "param") -> Tensor:
        tensor = self.weights.full(name, key)
        layer = name.removesuffix(".weight")
        if key == "param" and f"{layer}.lora_A.weight" in self.adapters:
            tensor = merged_weight(tensor, self.adapters[f"{layer}.lora_A.weight"],
                                   self.adapters[f"{layer}.lora_B.weight"], scale=self.spec.scale)
        return tensor

    def specs(self, names: list[str] | None = None) -> list[TensorSpec]:
        return self.weights.specs(names if names is not None else self.names())

    def source(self, model_cfg: Any) -> MergedReader:
        return MergedReader(self.weights.source(model_cfg), self.adapters, self.spec)


def lora_export(export: Any, spec: LoRASpec | None, out_dir: str | Path) -> Any:
    """Wrap an engine's ``exported_weights`` context for LoRA: on rank 0 the merged view (``MergedExport``) and the
    adapters written in the PEFT format to ``<out_dir>_lora/``; unchanged without LoRA."""
    import contextlib

    if spec is None:
        return export

    @contextlib.contextmanager
    def merged() -> Any:
        with export as weights:
            if weights is None:
                yield None
                return
            view = MergedExport(weights, spec)
            out = Path(out_dir)
            write_peft_adapter(view.adapters, spec, out.with_name(out.name + "_lora"))
            yield view

    return merged()
