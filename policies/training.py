"""Training loop for any policy whose ``forward(batch, step)`` returns ``(loss, logs)``.

AdamW with linear warm-up then cosine decay (``torch.optim.lr_scheduler.LambdaLR``),
gradient clipping, optional EMA of the weights (``torch.optim.swa_utils.AveragedModel``),
a parameter group per learning rate (MoE routers and scale adapters at
``router_lr_scale`` times the base rate, as AdaMoE trains them at 2x), a progress bar,
metrics as JSON lines, a loss-curve PNG, atomic checkpoints that resume exactly, and
multi-process data parallelism when launched by ``torchrun`` (gloo on CPU, nccl on GPU).

Output directory::

    metrics.jsonl                            one line per logged step
    loss.png                                 the training curves
    checkpoints/last/pretrained_model/       what ``from_pretrained`` loads (EMA weights if enabled)
    checkpoints/last/training_state/         optimizer, raw weights, step and RNG states, to resume
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

import adamoe
from policies.io import atomic_directory, write_text
from policies.plotting import pyplot, save_figure
from policies.pretrained import load_state_dict_checked, read_weights, save_tensors

CHECKPOINT_DIR = Path("checkpoints") / "last"


@dataclass
class TrainConfig:
    """What a run trains with. Resuming compares the settings that shape the run (all
    but :data:`RESUME_FREE`) with the checkpoint's and says what changed."""

    steps: int = 3000
    batch_size: int = 64  # global: split evenly over data-parallel processes
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of lr
    grad_clip: float = 1.0
    ema_decay: float | None = None  # e.g. 0.999; the saved model then holds the EMA weights
    router_lr_scale: float = 2.0  # MoE routers and scale adapters (AdaMoE: 2x)
    image_shift: int = 4  # random-shift augmentation in pixels (0: none)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    max_minutes: float | None = None  # stop early (and save) once this much wall time has passed
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "warmup_steps", "image_shift", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("steps", "batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip", "router_lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        for name in ("warmup_steps", "image_shift", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_minutes is not None and not (
            isinstance(self.max_minutes, (int, float)) and math.isfinite(self.max_minutes) and self.max_minutes > 0
        ):
            raise ValueError(f"max_minutes must be a finite number > 0, or None for no limit, got {self.max_minutes!r}")


# Settings that may change between a run and its resumption without changing what it learns.
RESUME_FREE = ("log_every", "save_every", "max_minutes", "device", "progress")


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``"lr 0.001 -> 0.002"`` for every setting that shapes the run and differs from the
    checkpoint's (``saved``: its ``train_config``)."""
    now = json.loads(json.dumps(asdict(config)))  # tuples as lists, as the checkpoint stores them
    return [
        f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k not in RESUME_FREE and k in saved and saved[k] != v
    ]


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a crash counts as past every step."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = ("auto", "cpu", "cuda")
    if not isinstance(name, str) or name.split(":")[0] not in valid:
        raise ValueError(f"device {name!r} is not one of {valid} (or cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
            raise ValueError(f"device {name!r}: CUDA is not available here ({build}); use 'cpu' or 'auto'")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(name)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def _ema_model(policy: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``policy``'s parameters (``torch.optim.swa_utils``),
    starting from its current weights; the decay warms up as ``min(decay, n / (n + 9))``
    after ``n`` updates, so the first steps are not held back by the initialisation."""

    def average(avg: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        count = float(n)  # read once per step, not once per parameter
        torch._foreach_lerp_(avg, current, 1.0 - min(decay, count / (count + 9.0)))

    averaged = torch.optim.swa_utils.AveragedModel(policy, multi_avg_fn=average, use_buffers=False)
    averaged.requires_grad_(False)  # a copy of the weights, never trained itself
    averaged.update_parameters(policy)  # n = 0: a copy of the start weights
    return averaged


def parameter_groups(policy: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Decayed matrices, undecayed vectors (norms, biases, embeddings of one row each), and
    the MoE routing parameters at their own learning rate."""
    routing = {id(p) for p in adamoe.router_parameters(policy)}
    decay, no_decay, router = [], [], []
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in routing:
            router.append(p)
        elif p.ndim < 2 or name.endswith(("_pos", "_embed", "embed.weight")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
    ]
    if router:
        groups.append(
            {
                "params": router,
                "weight_decay": config.weight_decay,
                "lr_scale": config.router_lr_scale,
                "name": "router",
            }
        )
    return [g for g in groups if g["params"]]


# -- distributed ----------------------------------------------------------------------


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# -- checkpoints ----------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: np.random.Generator,
    ema: list[torch.Tensor] | None,
    config: TrainConfig,
) -> None:
    """``pretrained_model/`` (EMA weights when enabled) and ``training_state/``, in one atomic rename."""
    with atomic_directory(directory) as tmp:
        if ema is not None:
            raw = [p.detach().clone() for p in policy.parameters()]
            _copy_into(policy, ema)
            policy.save_pretrained(tmp / "pretrained_model")
            _copy_into(policy, raw)
        else:
            policy.save_pretrained(tmp / "pretrained_model")
        state_dir = tmp / "training_state"
        state_dir.mkdir()
        tensors = {f"model.{k}": v for k, v in policy.state_dict().items()}
        opt = optimizer.state_dict()
        for index, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
        if ema is not None:
            tensors.update({f"ema.{i}": t for i, t in enumerate(ema)})
        tensors["rng.torch"] = torch.get_rng_state()
        save_tensors(tensors, state_dir / "state.safetensors")
        meta = {
            "step": step,
            "param_groups": opt["param_groups"],
            "numpy_rng": rng.bit_generator.state,
            "train_config": asdict(config),
        }
        (state_dir / "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(
    directory: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None
) -> tuple[int, np.random.Generator]:
    """Restore what :func:`save_checkpoint` wrote; returns (next step, numpy generator)."""
    state_dir = directory / "training_state"
    meta = json.loads((state_dir / "state.json").read_text())
    tensors = read_weights(state_dir / "state.safetensors")
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_dict_checked(policy, model, str(state_dir / "state.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    if ema is not None:
        for i, t in enumerate(ema):
            key = f"ema.{i}"
            t.copy_(tensors[key] if key in tensors else list(policy.parameters())[i].detach())
    torch.set_rng_state(tensors["rng.torch"])
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["step"]), rng


def _copy_into(policy: nn.Module, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(policy.parameters(), values, strict=True):
            p.copy_(v)


# -- the loop -----------------------------------------------------------------------


@contextmanager
def _interrupt_between_steps() -> Iterator[threading.Event]:
    """While inside, a first Ctrl-C (SIGINT) sets the event instead of raising in the middle
    of a step, so training saves the step it finished and then raises ``KeyboardInterrupt``
    (a rerun resumes from there); a second Ctrl-C raises at once. The previous handler
    comes back after. Only the main thread can install a handler; elsewhere Ctrl-C raises
    as usual and training resumes from its last periodic checkpoint."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def handler(signum: int, frame: Any) -> None:
        if asked.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        asked.set()
        # os.write, not print: a handler may run in the middle of another write to the stream.
        os.write(2, b"\ninterrupt: saving the step in progress (Ctrl-C again to stop at once, unsaved)\n")

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # Ctrl-C is ignored here (nohup, a background job): leave it so
        yield asked
        return
    if previous is None:  # a handler not installed from Python: restore Python's default
        previous = signal.default_int_handler
    signal.signal(signal.SIGINT, handler)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def training_seconds(metrics: str | os.PathLike) -> float:
    """The wall time a run's ``metrics.jsonl`` records, over every segment (a resumed or
    paused run restarts ``elapsed_s`` at each segment: each segment's last value counts)."""
    total, previous = 0.0, 0.0
    for line in Path(metrics).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if record["elapsed_s"] < previous:
            total += previous
        previous = record["elapsed_s"]
    return total + previous


def train(
    policy: nn.Module,
    dataset: Any,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    resume: bool = True,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``policy`` on ``dataset`` (anything with ``sample(batch_size, rng, shift)``).

    Resumes from ``output_dir/checkpoints/last`` when it exists and ``resume``. ``stop_at``
    pauses at that step (saving a checkpoint) on the schedule of ``config.steps``, so a
    caller can evaluate along the way and call again to carry on exactly. Returns a
    summary (steps, final loss, wall time, checkpoint path).
    """
    config.validate()
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    if end < 1:
        raise ValueError(f"stop_at must be >= 1, got {stop_at!r}")
    device = resolve_device(config.device)
    rank, world = init_distributed(device)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must divide evenly over {world} processes")
    out = Path(output_dir)
    checkpoint = out / CHECKPOINT_DIR
    torch.manual_seed(config.seed + rank)
    rng = np.random.default_rng([config.seed, rank])

    policy.to(device).train()
    groups = parameter_groups(policy, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = config.lr * group["lr_scale"]
    averaged = _ema_model(policy, config.ema_decay) if config.ema_decay else None
    ema = list(averaged.module.parameters()) if averaged is not None else None
    start = 0
    state_json = checkpoint / "training_state" / "state.json"
    if resume and state_json.is_file():
        changed = resume_changes(json.loads(state_json.read_text()).get("train_config", {}), config)
        if changed and rank == 0:
            warnings.warn(
                f"resuming {checkpoint} with settings that differ from its run: {'; '.join(changed)} "
                "(pass resume=False to start over)",
                UserWarning,
                stacklevel=2,
            )
        start, rng = load_checkpoint(checkpoint, policy, optimizer, ema)
        if rank == 0:
            tqdm.write(f"resuming {checkpoint} at step {start} of {config.steps}")
        for group in optimizer.param_groups:  # checkpoints written before the scheduler kept it
            group.setdefault("initial_lr", config.lr * group["lr_scale"])
        if averaged is not None:
            averaged.n_averaged.fill_(start + 1)  # the start weights, then one update per step
        if world > 1:  # each rank continues its own sample stream
            rng = np.random.default_rng([config.seed, rank, start])
    # Warm-up then cosine decay (``lr_factor``), from the step training starts or resumes at.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config), last_epoch=start - 1)
    model: nn.Module = policy
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None
        )

    is_main = rank == 0
    metrics_path = out / "metrics.jsonl"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:
            metrics_path.unlink(missing_ok=True)  # a fresh run, not a continuation
        elif metrics_path.is_file():  # drop what was logged after the checkpoint: those steps rerun
            kept = [line for line in metrics_path.read_text().splitlines() if _step_of(line) <= start]
            write_text(metrics_path, "".join(line + "\n" for line in kept))
    local_batch = config.batch_size // world
    began, last_log, samples = time.perf_counter(), time.perf_counter(), 0
    loss_value, step = float("nan"), start
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not (is_main and config.progress))
    with _interrupt_between_steps() as interrupt:
        for step in range(start, end):
            lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]
            batch = dataset.sample(local_batch, rng, config.image_shift)
            loss, logs = model(batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip))
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(policy)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step}")
            samples += config.batch_size
            done = step + 1
            bar.update(1)
            if is_main and (done % config.log_every == 0 or done == config.steps):
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": loss_value,
                    **logs,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "samples_per_s": samples / (now - last_log),
                    "elapsed_s": now - began,
                }
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{loss_value:.4f}")
                last_log, samples = now, 0
            out_of_time = config.max_minutes is not None and time.perf_counter() - began > 60 * config.max_minutes
            interrupted = interrupt.is_set()
            if world > 1:  # every rank must stop at the same step
                flags = torch.tensor([float(out_of_time), float(interrupted)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                out_of_time, interrupted = bool(flags[0].item()), bool(flags[1].item())
            if is_main and (done % config.save_every == 0 or done == end or out_of_time or interrupted):
                save_checkpoint(checkpoint, policy, optimizer, done, rng, ema, config)
                plot_metrics(metrics_path, out / "loss.png")
            if interrupted or out_of_time:
                break
        # A Ctrl-C during the last step's save counts too: the run stops here, saved.
        interrupted = interrupt.is_set()
        if world > 1:
            flag = torch.tensor([float(interrupted)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            interrupted = bool(flag.item())
    bar.close()
    if interrupted:
        if world > 1:
            dist.barrier()  # every rank waits for rank 0's save before the run ends
        raise KeyboardInterrupt(
            f"training interrupted after step {step + 1}, saved in {checkpoint}; "
            "run the same command again to resume from it"
        )
    if world > 1:
        dist.barrier()
    if ema is not None:
        _copy_into(policy, ema)  # hand back the weights that were saved
    policy.eval()
    return {
        "steps": step + 1 if end > start else start,
        "final_loss": loss_value,
        "wall_s": time.perf_counter() - began,
        "checkpoint": str(checkpoint / "pretrained_model"),
    }


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss (and MoE balance loss, learning rate) against step, from ``metrics.jsonl``."""
    if not metrics_path.is_file():
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    plt = pyplot()
    steps = [r["step"] for r in records]
    panels = [("loss", "training loss"), ("balance_loss", "MoE balance loss"), ("lr", "learning rate")]
    panels = [(k, t) for k, t in panels if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        values = [r.get(key, np.nan) for r in records]
        ax.plot(steps, values, color="#4c72b0", linewidth=1)
        if key == "loss":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png_path)
