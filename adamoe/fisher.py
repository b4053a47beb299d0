"""Diagonal Fisher information of a policy on its own data (Matena & Raffel, arXiv 2111.09832).

The policy is read as a Gaussian over actions with mean ``mu_theta(x)`` and a fixed
standard deviation ``sigma``. Two estimates of ``diag F`` over samples ``x``:

- ``exact``: the expectation over the model's own action distribution, which for a
  Gaussian has the closed form ``sum_k (d mu_k / d theta)^2 / sigma^2`` per sample;
- ``empirical``: the squared gradient of the log-likelihood of the dataset's action,
  ``(d/d theta log N(a; mu(x), sigma^2))^2`` per sample.

Both need per-sample gradients. ``method="vmap"`` computes them for a whole batch at once
with ``torch.func`` (``vmap`` over ``jacrev`` / ``grad`` of a functional call);
``method="loop"`` is the plain per-sample autograd loop (the reference, and a fallback
for models that ``vmap`` cannot trace).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm.auto import tqdm

KINDS = ("exact", "empirical")
METHODS = ("vmap", "loop")

# mean_fn(model, batch) -> (B, A) action means; target_fn(batch) -> (B, A) dataset actions.
MeanFn = Callable[[nn.Module, Any], torch.Tensor]
TargetFn = Callable[[Any], torch.Tensor]


class _Mean(nn.Module):
    """``mean_fn`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, mean_fn: MeanFn) -> None:
        super().__init__()
        self.model = model
        self.mean_fn = mean_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.mean_fn(self.model, batch)


def _batch_size(batch: Any) -> int:
    leaves = [v for v in torch.utils._pytree.tree_leaves(batch) if isinstance(v, torch.Tensor)]
    if not leaves:
        raise ValueError("a Fisher batch must hold at least one tensor with a leading batch dimension")
    return leaves[0].shape[0]


def _take(batch: Any, start: int, stop: int) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v[start:stop] if isinstance(v, torch.Tensor) else v, batch)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    mean_fn: MeanFn,
    target_fn: TargetFn | None = None,
    kind: str = "exact",
    sigma: float = 1.0,
    max_samples: int | None = None,
    method: str = "vmap",
    parameters: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher, ``{parameter name: tensor of its shape}``, averaged over samples.

    ``batches`` yields whatever ``mean_fn`` takes: tensors (or dicts / tuples of them)
    whose leading dimension is the batch; a sample is one row of each. ``target_fn`` gives
    the dataset actions (``kind="empirical"`` only). ``parameters`` restricts the result to
    those names (default: every parameter that requires grad). The model is put in eval
    mode for the computation (no dropout), and put back afterwards.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if kind == "empirical" and target_fn is None:
        raise ValueError("kind='empirical' needs target_fn (the dataset actions of a batch)")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if parameters is not None:
        wanted = list(parameters)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ValueError(f"no trainable parameter named {unknown[0]!r}; the model has {sorted(named)[:8]}...")
        named = {n: named[n] for n in wanted}
    if not named:
        raise ValueError("the model has no trainable parameters to compute a Fisher for")

    wrapper = _Mean(model, mean_fn)
    params = {f"model.{n}": p.detach() for n, p in named.items()}
    frozen = {f"model.{n}": b for n, b in model.named_buffers()}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    count = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=max_samples, desc=f"fisher ({kind})", unit="sample", disable=not progress)
    try:
        for batch in batches:
            n = _batch_size(batch)
            if max_samples is not None:
                n = min(n, max_samples - count)
                batch = _take(batch, 0, n)
            if n <= 0:
                break
            target = target_fn(batch) if target_fn is not None else None
            step = _vmap_squares if method == "vmap" else _loop_squares
            squares = step(wrapper, params, frozen, batch, target, kind)
            for name in named:
                total[name] += squares[f"model.{name}"].double()
            count += n
            bar.update(n)
            if max_samples is not None and count >= max_samples:
                break
    finally:
        bar.close()
        model.train(was_training)
    if count == 0:
        raise ValueError("no samples: the batches were empty")
    # exact: sum_k (d mu_k)^2 / sigma^2; empirical: ((a - mu) d mu / sigma^2)^2.
    scale = 1.0 / (count * sigma ** (2 if kind == "exact" else 4))
    return {n: (total[n] * scale).to(p.dtype) for n, p in named.items()}


def _loglik(mu: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Gaussian log-likelihood times sigma^2, up to a constant: its gradient is sigma^2
    times the true one, so squared gradients are rescaled by 1 / sigma^4 at the end."""
    return -0.5 * ((target - mu) ** 2).sum()


def _vmap_squares(
    wrapper: nn.Module,
    params: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    batch: Any,
    target: torch.Tensor | None,
    kind: str,
) -> dict[str, torch.Tensor]:
    """Sum over the batch of the per-sample squared derivatives, with ``torch.func``."""

    def mean_one(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = torch.utils._pytree.tree_map(lambda v: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v, sample)
        return functional_call(wrapper, {**p, **frozen}, (one,))[0]  # (A,)

    if kind == "exact":
        jac = vmap(jacrev(mean_one), in_dims=(None, 0))(params, batch)  # name -> (B, A, *shape)
        return {n: j.pow(2).sum(dim=(0, 1)) for n, j in jac.items()}

    def loglik_one(p: dict[str, torch.Tensor], sample: Any, a: torch.Tensor) -> torch.Tensor:
        return _loglik(mean_one(p, sample), a)

    grads = vmap(grad(loglik_one), in_dims=(None, 0, 0))(params, batch, target)  # name -> (B, *shape)
    return {n: g.pow(2).sum(dim=0) for n, g in grads.items()}


def _loop_squares(
    wrapper: nn.Module,
    params: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    batch: Any,
    target: torch.Tensor | None,
    kind: str,
) -> dict[str, torch.Tensor]:
    """The same sums with one autograd pass per sample (and per action dimension: exact)."""
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(_batch_size(batch)):
        mu = functional_call(wrapper, {**leaves, **frozen}, (_take(batch, i, i + 1),))[0]
        outputs = list(mu) if kind == "exact" else [_loglik(mu, target[i])]
        for value in outputs:
            grads = torch.autograd.grad(value, list(leaves.values()), retain_graph=True, allow_unused=True)
            for name, g in zip(leaves, grads, strict=True):
                if g is not None:
                    out[name] += g.pow(2)
    return out


def save_fisher(
    fisher: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a Fisher as safetensors, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"format": "adamoe-fisher", "metadata": json.dumps(dict(metadata or {}))}
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in fisher.items()}, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fisher_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`save_fisher` stored with a Fisher (task, samples...), tensors unread."""
    return json.loads(_fisher_header(Path(path)).get("metadata") or "{}")


def _fisher_header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"no Fisher file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): it is truncated or damaged") from exc
    if header.get("format") != "adamoe-fisher":
        raise ValueError(
            f"{path} is not a Fisher file written by save_fisher (its format is {header.get('format')!r}, not "
            "'adamoe-fisher'); a checkpoint's model.safetensors holds weights, not Fisher information"
        )
    return header


def load_fisher(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Fisher written by :func:`save_fisher` (safetensors: nothing is unpickled)."""
    path = Path(path)
    _fisher_header(path)
    return load_file(str(path))
