"""Per-step training metrics: JSONL log, console progress line with ETA, wandb, optional TensorBoard; MFU.

    from train.metrics import MetricsLogger, Throughput, peak_flops_per_device
    tp = Throughput(flops_per_token=model_flops_per_token(cfg, seq_len), peak_flops=peak, devices=world)
    logger = MetricsLogger(run_dir, total_steps=1000, wandb_cfg=..., config=cfg.to_dict(), enabled=rank == 0)
    logger.log_step({"step": 1, "loss": 9.1, "lr": 3e-4, "grad_norm": 1.2, **tp.measure(tokens, seconds)})
    logger.log_validation(step=50, loss=4.2)

``RUN_DIR/metrics.jsonl``: one JSON object per optimizer step (``"type": "train"``: step, loss, lr, grad_norm,
tokens, tokens_per_s, tflops_per_device, mfu, peak_flops, step_time_s, mem_gb, skipped, ...) and one per
validation pass (``"type": "validation"``: step, val_loss, val_ppl). The console line and wandb show exactly
the values of the JSONL record (the console rounds them for display). On resume the log is cut back to the
checkpoint's step first, so each step appears once, with the values of the run that produced the weights.

MFU = achieved model FLOP/s per device / peak FLOP/s per device. Model FLOPs per token come from
``model.config.model_flops_per_token`` (the single source of truth): 6 x (non-embedding parameters + output
head) + 12 x n_layers x dim x seq_len x 1/2 (causal attention: QK^T and PV forward+backward, half the square).
Embedding lookups are not FLOPs; recomputation is not counted. The tokens are those the model computed
(``ComputedTokens``: rows x padded length of every micro-batch, summed over data-parallel ranks), not the
configured ``global_batch_size x seq_len``, so short padded batches (SFT, GAtt) and pairs (RM) do not inflate it. Peak per device (``peak_flops_per_device``),
first that applies: ``logging.peak_tflops`` (config), ``LLAMA_PEAK_FLOPS`` (environment); on a GPU the dense
datasheet peak of the precision the matmuls run in (bf16 for ``train.dtype = "bf16"``, TF32 or FP32 for fp32
by ``torch.get_float32_matmul_precision()``) from ``train.devices``, matched on ``torch.cuda.get_device_name()``
(or the row ``logging.gpu`` names) and scaled down for MIG slices by their SM count; an unknown GPU and the CPU
get a measured matmul peak (CPU: ``measure_cpu_matmul_peak``, the best of repeated 1024^3 and 2048^3 fp32
matmuls through both GEMM libraries torch ships, MKL and oneDNN, for ~1 s), measured once per run directory
and cached in ``RUN_DIR/peak_flops.json``. Only global rank 0 logs (``enabled``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows: for benchmark records."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_matmul_peaks(*, seconds: float = 1.0, sizes: tuple[int, ...] = (1024, 2048)) -> dict[str, float]:
    """Best observed fp32 FLOP/s of square ``n x n`` matmuls with this process's torch threads, per library and n.

    Keys ``"torch.mm n=N"`` (MKL on x86 builds) and, when the build has oneDNN, ``"onednn n=N"`` (the right
    operand reordered once, as TorchInductor's CPU weight prepacking does; ``model/prepack.py``). Both count:
    on the 2-core AMD EPYC benchmark machine torch.mm reaches ~190-205 GFLOP/s and oneDNN ~215-229, the
    2 x 16-lane FMA limit at ~3.6 GHz, so a peak from torch.mm 2048^3 alone would overstate every MFU by ~15%.
    ``seconds`` is shared out over the (library, n) pairs; each reports its fastest repetition.
    """
    from model import prepack

    runners: dict[str, Any] = {}
    for n in sizes:
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        runners[f"torch.mm n={n}"] = (n, lambda a=a, b=b, out=out: torch.mm(a, b, out=out))
        if prepack.available():
            packed = prepack.pack(b, batch=n)
            runners[f"onednn n={n}"] = (n, lambda a=a, packed=packed: prepack.linear(a, packed))
    peaks: dict[str, float] = {}
    with torch.no_grad():
        for name, (n, run) in runners.items():
            run()  # warm-up
            best, start = 0.0, time.perf_counter()
            while time.perf_counter() - start < seconds / len(runners):
                t0 = time.perf_counter()
                run()
                best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
            peaks[name] = best
    return peaks


def measure_cpu_matmul_peak(*, seconds: float = 1.0) -> float:
    """The best of ``measure_cpu_matmul_peaks``: the fp32 matmul rate this CPU demonstrably reaches."""
    return max(measure_cpu_matmul_peaks(seconds=seconds).values())


def matmul_precision(dtype: str) -> str:
    """The tensor-core precision the matmuls of a ``train.dtype`` run use on a GPU (a ``train.devices`` key)."""
    if dtype == "bf16":
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def datasheet_peak(name: str, *, precision: str, sm_count: int | None = None,
                   device_key: str = "") -> tuple[float, str] | None:
    """(dense peak FLOP/s, source) for a reported GPU name, or None when the table does not know it.

    ``device_key`` (``logging.gpu``) picks the row instead of the name; ``sm_count`` below the full part's
    scales the peak (a MIG slice)."""
    from train.devices import device_spec, match_device

    spec = device_spec(device_key) if device_key else match_device(name)
    if spec is None:
        return None
    peak = spec.peak_flops(precision, sm_count=sm_count)
    source = f"{name}: {spec.label} dense {precision} {peak / 1e12:.1f} TFLOP/s (train/devices.py)"
    if spec.sms and sm_count is not None and 0 < sm_count < spec.sms:
        source += f", scaled to {sm_count} of {spec.sms} SMs"
    return peak, source


def measure_gpu_matmul_peak(*, dtype: torch.dtype, seconds: float = 1.0, n: int = 8192) -> float:
    """Best observed FLOP/s of ``n^3`` matmuls in ``dtype`` on the current GPU (for GPUs not in the table)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    torch.mm(a, b)
    torch.cuda.synchronize()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _measured_peak(dtype: str) -> tuple[float, str]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        return (measure_gpu_matmul_peak(dtype=torch_dtype),
                f"{name} is not in train/devices.py: measured {dtype} matmul peak (a lower bound of the "
                "datasheet figure, so MFU reads high; set logging.peak_tflops to the datasheet's dense figure)")
    return (measure_cpu_matmul_peak(),
            f"measured fp32 matmul peak (best of torch.mm and oneDNN), {torch.get_num_threads()} threads")


def peak_flops_per_device(run_dir: str | Path | None = None, *, dtype: str = "fp32", override_tflops: float = 0.0,
                          device_key: str = "") -> tuple[float, str]:
    """(peak FLOP/s per device, how it was obtained): the basis of MFU (the module docstring gives the order)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "logging.peak_tflops"
    env = os.environ.get("LLAMA_PEAK_FLOPS")
    if env:
        return float(env), "LLAMA_PEAK_FLOPS"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        found = datasheet_peak(props.name, precision=matmul_precision(dtype), sm_count=props.multi_processor_count,
                               device_key=device_key)
        if found is not None:
            return found
    cache = Path(run_dir) / "peak_flops.json" if run_dir is not None else None
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        return float(data["peak_flops"]), data["source"]
    peak, source = _measured_peak(dtype)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"peak_flops": peak, "source": source}) + "\n")
    return peak, source


class ComputedTokens:
    """The micro-batches the engine draws, passed through and counted: tokens the model actually computes (rows x
    padded length of ``input_ids``, so a reward model's two rows per pair and a stage's short padded batches count
    as computed, not as ``global_batch_size x seq_len``) and their model FLOPs at that length. ``pop()`` per step."""

    def __init__(self, batches: Any, model_cfg: Any) -> None:
        self.batches, self.model_cfg = batches, model_cfg
        self.tokens, self.flops = 0, 0.0

    def __iter__(self) -> ComputedTokens:
        return self

    def __next__(self) -> Any:
        from model.config import model_flops_per_token

        batch = next(self.batches)
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            n, length = ids.numel(), ids.shape[-1]
            self.tokens += n
            self.flops += n * model_flops_per_token(self.model_cfg, length)
        return batch

    def pop(self) -> tuple[int, float]:
        """(tokens, FLOPs) drawn since the last call, on this rank."""
        out, self.tokens, self.flops = (self.tokens, self.flops), 0, 0.0
        return out


class Throughput:
    """tokens/s, TFLOP/s per device and MFU of one step."""

    def __init__(self, *, flops_per_token: float, peak_flops: float, devices: int) -> None:
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices

    def measure(self, tokens: int, seconds: float, *, flops: float | None = None) -> dict[str, float]:
        """``flops``: the step's model FLOPs over all devices when known (``ComputedTokens``), else
        ``tokens x flops_per_token``."""
        tokens_per_s = tokens / max(seconds, 1e-9)
        total = flops if flops is not None else self.flops_per_token * tokens
        flops_per_device = total / max(seconds, 1e-9) / self.devices
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12,
                "mfu": flops_per_device / self.peak_flops, "step_time_s": seconds}


def memory_gb() -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20 if sys.platform != "darwin" else rss_kb / 2**30


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def console_line(rec: dict[str, Any], *, total_steps: int, eta_s: float) -> str:
    """``step 12/100 | loss 5.1234 | lr 3.00e-04 | gnorm 1.234 | 12,345 tok/s | ... | ETA 0:01:23``."""
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s",
             f"{rec['tflops_per_device']:.3f} TFLOP/s/dev", f"MFU {100 * rec['mfu']:.1f}%",
             f"{rec['step_time_s']:.2f} s/step", f"mem {rec['mem_gb']:.2f} GB", f"ETA {format_eta(eta_s)}"]
    if rec.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    if rec.get("spike"):
        parts.append("SPIKE")
    return " | ".join(parts)


def truncate_jsonl(path: Path, *, after_step: int) -> None:
    """Keep only records with ``step <= after_step`` (resume replays later steps); atomic rewrite."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill -9 mid-write
        if rec.get("step", 0) <= after_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def wandb_mode(configured: str) -> str:
    """The explicit mode, else "online" when an API key or a `wandb login` netrc entry exists, else "offline"."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class MetricsLogger:
    """Writes metrics.jsonl, prints the progress line, mirrors to wandb / TensorBoard. No-op unless enabled."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, config: dict[str, Any], enabled: bool = True,
                 log_every: int = 1, wandb: bool = False, wandb_project: str = "llama-stack",
                 wandb_mode_setting: str = "", wandb_id: str | None = None, tensorboard: bool = False,
                 start_step: int = 0, print_fn: Any = print) -> None:
        self.run_dir, self.total_steps, self.enabled = Path(run_dir), total_steps, enabled
        self.log_every, self.print = max(1, log_every), print_fn
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb_run: Any = None
        self.wandb_id = wandb_id
        self.tb: Any = None
        self._start_step, self._start_time = start_step, time.perf_counter()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, after_step=start_step)
        self._fh = open(self.path, "a")
        if wandb:
            self._init_wandb(project=wandb_project, mode=wandb_mode(wandb_mode_setting), config=config)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self.print("tensorboard is not installed: TensorBoard logging skipped (pip install tensorboard)")

    def _init_wandb(self, *, project: str, mode: str, config: dict[str, Any]) -> None:
        if mode == "disabled":
            return
        import wandb  # lazy: ~1 s import, and only rank 0 needs it
        from wandb.sdk.lib.runid import generate_id

        self.wandb_id = self.wandb_id or generate_id()
        self.wandb_run = wandb.init(project=project, dir=str(self.run_dir), id=self.wandb_id, resume="allow",
                                    config=config, mode=mode, name=self.run_dir.name,
                                    settings=wandb.Settings(console="off", x_disable_stats=True,
                                                            silent=True))

    def _write(self, rec: dict[str, Any]) -> None:
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()  # a kill -9 loses at most the line being written (cut lines are skipped on resume)

    def log_step(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Complete and write one optimizer step's record; returns it (as written)."""
        rec = {"type": "train", **rec, "mem_gb": memory_gb()}
        if not self.enabled:
            return rec
        rec["elapsed_s"] = time.perf_counter() - self._start_time
        self._write(rec)
        done = rec["step"] - self._start_step
        eta = rec["elapsed_s"] / max(done, 1) * (self.total_steps - rec["step"])
        if rec["step"] % self.log_every == 0 or rec["step"] == self.total_steps or rec.get("skipped"):
            self.print(console_line(rec, total_steps=self.total_steps, eta_s=eta), flush=True)
        numeric = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in numeric.items() if k != "step"}, step=rec["step"])
        if self.tb is not None:
            for k, v in numeric.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        return rec

    def log_validation(self, *, step: int, loss: float, name: str = "held-out next-token loss",
                       perplexity: bool = True) -> dict[str, Any]:
        """One ``{"type": "validation", "step", "val_loss", "val_name"[, "val_ppl"]}`` record; ``val_ppl`` only for
        a per-token cross-entropy (``perplexity``), never for a ranking loss."""
        rec: dict[str, Any] = {"type": "validation", "step": step, "val_loss": loss, "val_name": name}
        if perplexity:
            rec["val_ppl"] = math.exp(loss) if loss < 700 else float("inf")
        if not self.enabled:
            return rec
        self._write(rec)
        ppl = f" | perplexity {rec['val_ppl']:.2f}" if perplexity else ""
        self.print(f"validation step {step} | {name} {loss:.4f}{ppl}", flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({"val/loss": loss, **({"val/ppl": rec["val_ppl"]} if perplexity else {})}, step=step)
        if self.tb is not None:
            self.tb.add_scalar("val/loss", loss, step)
        return rec

    def log_benchmarks(self, *, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """One ``{"type": "benchmark", "step", "eval/<task>/<metric>": value, ...}`` record ([eval] in the loop)."""
        rec = {"type": "benchmark", "step": step, **metrics}
        if not self.enabled:
            return rec
        self._write(rec)
        shown = " | ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items())
        self.print(f"benchmarks step {step} | {shown}", flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        return rec

    def log_event(self, message: str) -> None:
        if self.enabled:
            self.print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tb is not None:
            self.tb.close()
