"""Training metrics: one JSON line per step in `<run_dir>/metrics.jsonl`, a compact console line, optional
Weights & Biases (offline unless asked), GPU memory and utilisation from NVML (read on every rank and summarised
by trainer/reduce.py), and loss.png at the end.

Records are written as given plus `"split": "train"` (or `"valid"` for `log_eval`); non-finite numbers
become JSON null so that every line is standard JSON. A resumed run first drops the records written after
its checkpoint, so the file reads as one consistent run. W&B gets a record's numbers and the numbers of its
dicts (e.g. `maxvio_layer/<layer>`), never lists: the per-rank lists (`per_rank`, every
`logging.per_rank_every` steps) go to metrics.jsonl only, so that W&B's keys per step do not grow with the
world size.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path
from typing import Any

import torch

from trainer.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LOADS_FILE = "expert_load.jsonl"
LOADS_PLOT = "expert_load.png"
ETA_WINDOW = 20  # step times averaged for the ETA


class Metrics:
    """Sink for a run's step and evaluation records (see the module docstring)."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, run_config: dict,
                 resume_step: int = 0) -> None:
        """`resume_step` is the step of the checkpoint the run resumes from (0 for a fresh run): records of
        later steps, left by the interrupted run, are removed from metrics.jsonl."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.total_steps = total_steps
        self.path = self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a")
        self.loads_path = self.run_dir / LOADS_FILE
        _truncate_after(self.loads_path, resume_step)
        self._step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._wandb = _start_wandb(cfg, self.run_dir, run_config) if cfg.wandb else None
        self._closed = False

    def log_step(self, record: dict[str, Any]) -> None:
        """One training step: `step, tokens, loss, lm_loss, mtp_loss, aux_loss, lr, grad_norm, maxvio,
        step_time_s, tokens_per_s, tflops_per_device, mfu` and any extra keys (e.g. `maxvio_layer`, `skipped`, the
        per-rank summaries of trainer/reduce.py)."""
        record = {"split": "train", **record}
        self._write(record)
        self._step_times.append(record["step_time_s"])
        step = record["step"]
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            print(self._progress_line(record), flush=True)

    def log_expert_loads(self, step: int, loads: dict[str, list[float]]) -> None:
        """Every MoE layer's tokens per expert at `step`, into expert_load.jsonl every logging.expert_load_every
        steps (for the heatmap; metrics.jsonl and W&B get the per-layer summaries only)."""
        every = self.cfg.expert_load_every
        if not every or not loads or (step % every and step != self.total_steps):
            return
        with open(self.loads_path, "a") as f:
            f.write(json.dumps({"step": step, "loads": loads}) + "\n")

    def log_eval(self, step: int, record: dict[str, Any]) -> None:
        """A validation result at `step`, e.g. {"val_loss": 3.2}."""
        record = {"step": step, "split": "valid", **record}
        self._write(record)
        values = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("step", "split"))
        print(f"step {step}/{self.total_steps} | {values}", flush=True)

    def close(self) -> Path | None:
        """Finish W&B, close the file and, with `logging.plot`, write loss.png; returns its path (or None)."""
        if self._closed:
            return None
        self._closed = True
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if not self.cfg.plot:
            return None
        if self.loads_path.exists():
            plot_expert_loads(self.loads_path, self.run_dir / LOADS_PLOT)
        return plot_losses(self.path, self.run_dir / PLOT_FILE)

    def _write(self, record: dict[str, Any]) -> None:
        record = _jsonable(record)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(_flat_numbers(record), step=record["step"])

    def _progress_line(self, r: dict[str, Any]) -> str:
        eta = sum(self._step_times) / len(self._step_times) * (self.total_steps - r["step"])
        loss = r.get("lm_loss", r["loss"])  # next-token loss, comparable with val_loss
        parts = [f"step {r['step']}/{self.total_steps}", f"loss {_fmt(loss)}", f"lr {r['lr']:.2e}",
                 f"{r['tokens_per_s']:,.0f} tok/s", f"maxvio {_fmt(r['maxvio'])}"]
        if isinstance(r.get("mfu"), float):
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if isinstance(r.get("gpu_mem_gb_max"), float):  # the fullest rank's memory, the mean utilisation
            parts.append(f"gpu {r['gpu_mem_gb_max']:.1f} GB {_fmt(r.get('gpu_util_mean'), '.0f')}%")
        if r.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, list):
        return "[" + " ".join(_fmt(v, ".3f") for v in value) + "]"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors to numbers or lists, non-finite floats to None."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flat_numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a record's dicts, nested keys joined by '/'; lists are left out (see the module
    docstring)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and name != "step":
            out[name] = float(value)
    return out


def _truncate_after(path: Path, step: int) -> None:
    """Drop records with a step past `step` (and a torn last line) from a previous run of this directory."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_config: dict) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError("logging.wandb=true but wandb is not installed; `pip install wandb` or set "
                          "logging.wandb=false") from err
    return wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir), config=run_config)


class GpuMonitor:
    """Memory in use and utilisation of the training GPU, read through NVML (nvidia-ml-py)."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml = nvml
        self.handle = handle

    @classmethod
    def create(cls) -> GpuMonitor | None:
        """A monitor of torch's current CUDA device, or None (quietly) without CUDA, NVML or a driver."""
        if not torch.cuda.is_available():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            uuid = str(getattr(props, "uuid", ""))
            if uuid:  # NVML counts devices without CUDA_VISIBLE_DEVICES, so match by UUID
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            return cls(pynvml, handle)
        except Exception:  # ImportError, NVMLError (no driver, no permission): GPU metrics are optional
            return None

    def name(self) -> str:
        """The GPU's name as NVML reports it (e.g. "NVIDIA H800")."""
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def read(self) -> dict[str, float]:
        try:
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        except Exception:
            return {}
        return {"gpu_mem_gb": memory.used / 2**30, "gpu_util": float(util.gpu)}


def plot_losses(metrics_file: Path, out: Path) -> Path | None:
    """loss.png: training (and MTP) loss per step and validation loss points; None without training records."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe off the main thread
    from matplotlib.ticker import ScalarFormatter

    train, valid = [], []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        (valid if record.get("split") == "valid" else train).append(record)
    if not train:
        return None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    shown: list[float] = []
    for key, label, style in (("lm_loss", "train loss (next token)", "-"), ("mtp_loss", "MTP loss", "--")):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if points:  # a run without MTP logs mtp_loss 0, which is left out
            ax.plot(*zip(*points), style, label=label, linewidth=1)
            shown += [v for _, v in points]
    points = [(r["step"], r["val_loss"]) for r in valid if isinstance(r.get("val_loss"), (int, float))]
    if points:
        ax.plot(*zip(*points), "o", label="validation loss", markersize=4)
        shown += [v for _, v in points]
    if shown and min(shown) > 0 and max(shown) / min(shown) > 4:  # a falling curve spanning decades
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_expert_loads(loads_file: Path, out: Path) -> Path | None:
    """expert_load.png: per MoE layer, each expert's share of the layer's tokens over the recorded steps, as
    load / mean load (1 = balanced; the paper's Figure 9 shows the same ratio per layer and expert)."""
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in loads_file.read_text().splitlines() if line.strip()]
    if not records:
        return None
    layers = list(records[-1]["loads"])
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    steps = [r["step"] for r in records]
    image = None
    for ax, layer in zip(axes.flat, layers):
        grid = torch.tensor([r["loads"].get(layer, [0.0] * len(records[-1]["loads"][layer])) for r in records],
                            dtype=torch.float64)  # (steps, experts)
        ratio = grid / grid.mean(1, keepdim=True).clamp_min(1e-12)
        image = ax.imshow(ratio.t().numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=2,
                          extent=(steps[0], steps[-1], -0.5, grid.shape[1] - 0.5), interpolation="nearest")
        ax.set_title(layer.removesuffix(".ffn.gate"), fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="load / mean load")
    fig.savefig(out)
    return out
