"""Merging models that share an architecture: uniform and Fisher-weighted averaging
(Matena & Raffel, arXiv 2111.09832), task arithmetic (Ilharco et al., 2023) and TIES
(Yadav et al., 2023), over the parameters a :class:`MergePlan` selects.

Each function takes state dicts (``{name: tensor}``) and returns the merged tensors of
the planned names only; parameters the plan keeps per model (task embeddings, heads)
stay with their models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

METHODS = ("average", "fisher", "task_arithmetic", "ties")
NORMALIZATIONS = (None, "trace", "l2")
StateDict = Mapping[str, torch.Tensor]


@dataclass
class MergePlan:
    """Which parameters are merged: names matching any ``merge`` pattern and no ``keep``
    pattern (regular expressions, ``re.search``). The default merges everything."""

    merge: list[str] = field(default_factory=lambda: [r".*"])
    keep: list[str] = field(default_factory=list)

    def merged_names(self, names: Sequence[str]) -> list[str]:
        merge = [re.compile(p) for p in self.merge]
        keep = [re.compile(p) for p in self.keep]
        return [n for n in names if any(p.search(n) for p in merge) and not any(p.search(n) for p in keep)]


def check_compatible(state_dicts: Sequence[StateDict], names: Sequence[str], what: str = "model") -> None:
    """Every state dict holds every name with the same shape; the first mismatch is named."""
    if not state_dicts:
        raise ValueError("nothing to merge: no models given")
    first = state_dicts[0]
    for name in names:
        if name not in first:
            raise ValueError(f"parameter {name!r} is missing from {what} 0")
        for i, sd in enumerate(state_dicts[1:], start=1):
            if name not in sd:
                raise ValueError(f"parameter {name!r} is in {what} 0 but missing from {what} {i}")
            if sd[name].shape != first[name].shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(first[name].shape)} in {what} 0 "
                    f"but {tuple(sd[name].shape)} in {what} {i}"
                )


def _names(state_dicts: Sequence[StateDict], plan: MergePlan | None) -> list[str]:
    if not state_dicts:
        raise ValueError("nothing to merge: no models given")
    names = (plan or MergePlan()).merged_names(list(state_dicts[0]))
    extra = [n for sd in state_dicts[1:] for n in (plan or MergePlan()).merged_names(list(sd)) if n not in names]
    if extra:
        raise ValueError(f"parameter {extra[0]!r} is planned for merging in a later model but missing from model 0")
    if not names:
        raise ValueError("the merge plan selects no parameters")
    check_compatible(state_dicts, names)
    return names


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} model weights for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"model weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) for w in weights]


def average(
    state_dicts: Sequence[StateDict], plan: MergePlan | None = None, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """``sum_i w_i theta_i / sum_i w_i`` (uniform by default)."""
    names = _names(state_dicts, plan)
    w = _weights(len(state_dicts), weights)
    total = sum(w)
    return {
        n: sum(wi * sd[n].double() for wi, sd in zip(w, state_dicts, strict=True))
        .div(total)
        .to(state_dicts[0][n].dtype)
        for n in names
    }


def normalize_fisher(fisher: StateDict, names: Sequence[str], how: str | None) -> dict[str, torch.Tensor]:
    """Scale one model's Fisher over ``names`` to unit trace (sum) or unit L2 norm."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalization={how!r} is not one of {NORMALIZATIONS}")
    values = {n: fisher[n].double() for n in names}
    if how is None:
        return values
    if how == "trace":
        norm = sum(v.sum() for v in values.values())
    else:
        norm = torch.sqrt(sum(v.pow(2).sum() for v in values.values()))
    if norm <= 0:
        return values  # all zero: the floor makes this model's entries count as the average
    return {n: v / norm for n, v in values.items()}


def fisher_merge(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[StateDict],
    plan: MergePlan | None = None,
    weights: Sequence[float] | None = None,
    floor: float = 1e-8,
    normalization: str | None = None,
) -> dict[str, torch.Tensor]:
    """``theta = sum_i w_i F_i theta_i / sum_i w_i F_i`` per entry, with ``F_i`` floored at
    ``floor``: an entry whose Fisher is zero in every model gets the (weighted) average
    rather than 0/0. ``normalization`` ("trace" or "l2") first rescales each model's Fisher
    over the merged parameters, so that no model dominates by the scale of its Fisher."""
    if len(fishers) != len(state_dicts):
        raise ValueError(f"got {len(fishers)} Fishers for {len(state_dicts)} models")
    if not floor > 0:
        raise ValueError(f"floor must be > 0 (it keeps all-zero entries finite), got {floor!r}")
    names = _names(state_dicts, plan)
    for i, fisher in enumerate(fishers):
        for name in names:
            if name not in fisher:
                raise ValueError(f"the Fisher of model {i} has no entry for parameter {name!r}")
            if fisher[name].shape != state_dicts[i][name].shape:
                raise ValueError(
                    f"the Fisher of model {i} has shape {tuple(fisher[name].shape)} for {name!r}, "
                    f"the parameter {tuple(state_dicts[i][name].shape)}"
                )
            values = fisher[name]
            if not torch.isfinite(values).all() or (values < 0).any():
                bad = "NaN or inf" if not torch.isfinite(values).all() else f"negative values (min {values.min():.3g})"
                raise ValueError(f"the Fisher of model {i} holds {bad} for {name!r}; a Fisher is finite and >= 0")
    w = _weights(len(state_dicts), weights)
    normalized = [normalize_fisher(f, names, normalization) for f in fishers]
    merged = {}
    for name in names:
        num = torch.zeros_like(state_dicts[0][name], dtype=torch.float64)
        den = torch.zeros_like(num)
        for wi, sd, fisher in zip(w, state_dicts, normalized, strict=True):
            f = wi * fisher[name].clamp_min(floor)
            num += f * sd[name].double()
            den += f
        merged[name] = (num / den).to(state_dicts[0][name].dtype)
    return merged


def task_vectors(state_dicts: Sequence[StateDict], base: StateDict, names: Sequence[str]) -> list[dict]:
    check_compatible([base, *state_dicts], names, what="model (0 = the base)")
    return [{n: sd[n].double() - base[n].double() for n in names} for sd in state_dicts]


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def task_arithmetic(
    state_dicts: Sequence[StateDict], base: StateDict, scale: float = 1.0, plan: MergePlan | None = None
) -> dict[str, torch.Tensor]:
    """``theta = theta_base + scale * sum_i (theta_i - theta_base)``."""
    _check_scale(scale)
    names = _names(state_dicts, plan)
    taus = task_vectors(state_dicts, base, names)
    return {n: (base[n].double() + scale * sum(t[n] for t in taus)).to(base[n].dtype) for n in names}


def ties_merge(
    state_dicts: Sequence[StateDict],
    base: StateDict,
    density: float = 0.2,
    scale: float = 1.0,
    plan: MergePlan | None = None,
) -> dict[str, torch.Tensor]:
    """TIES: trim each task vector to its ``density`` fraction of largest magnitudes (over
    all merged parameters of that model), elect each entry's sign as the sign of the
    trimmed vectors' sum, average the entries that agree with it, and add ``scale`` times
    that to the base."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    _check_scale(scale)
    names = _names(state_dicts, plan)
    taus = task_vectors(state_dicts, base, names)
    trimmed = []
    for tau in taus:
        flat = torch.cat([tau[n].flatten() for n in names])
        k = max(1, int(round(density * flat.numel())))
        threshold = flat.abs().kthvalue(flat.numel() - k + 1).values if k < flat.numel() else flat.abs().min() - 1
        trimmed.append({n: torch.where(tau[n].abs() >= threshold, tau[n], torch.zeros_like(tau[n])) for n in names})
    merged = {}
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])  # (M, *shape)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0).clamp_min(1)
        tau = torch.where(agree, stack, torch.zeros_like(stack)).sum(0) / count
        merged[n] = (base[n].double() + scale * tau).to(base[n].dtype)
    return merged


def merge(
    state_dicts: Sequence[StateDict],
    method: str = "average",
    *,
    fishers: Sequence[StateDict] | None = None,
    base: StateDict | None = None,
    plan: MergePlan | None = None,
    weights: Sequence[float] | None = None,
    floor: float = 1e-8,
    normalization: str | None = None,
    scale: float = 1.0,
    density: float = 0.2,
) -> dict[str, torch.Tensor]:
    """One entry point for every method; returns the merged tensors of the planned names."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "average":
        return average(state_dicts, plan, weights)
    if method == "fisher":
        if fishers is None:
            raise ValueError("method='fisher' needs fishers (one per model; see adamoe.fisher_diagonal)")
        return fisher_merge(state_dicts, fishers, plan, weights, floor, normalization)
    if base is None:
        raise ValueError(f"method={method!r} needs base: the common initialisation the models were fine-tuned from")
    if method == "task_arithmetic":
        return task_arithmetic(state_dicts, base, scale, plan)
    return ties_merge(state_dicts, base, density, scale, plan)
