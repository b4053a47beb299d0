"""Diagonal Fisher with ``torch.func`` (vmap over jacrev) versus a per-sample autograd
loop (same values), on two models; and the time to merge two Decision Transformer
specialists.

- A policy-sized MLP (17-d observation -> 2 x 128 hidden -> 6 tanh actions, ~20k
  parameters, HalfCheetah's sizes), 256 samples: each sample's backward pass is tiny, so
  the loop is bound by Python and autograd overhead, which vmap removes.
- The reference Decision Transformer (context 20, 3 layers, 128 wide, 1 head; the
  tabletop's 29-d state and 4-d action; two tasks), 64 windows: a window's backward pass
  (60 tokens through 3 blocks) is real arithmetic, the same FLOPs either way, so vmap
  can only remove the overhead that is left.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from adamoe import fisher_diagonal
from policies.dt.data import OfflineData, Trajectory, window_sampler
from policies.dt.merging import merge_specialists
from policies.dt.recipe import build_model
from policies.dt.training import specialist_from

SAMPLES = 256
DT_SAMPLES = 64
BATCH = 16  # vmap(jacrev) holds batch x action_dim x parameters floats at once


def _policy(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(17, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 6), nn.Tanh())


def _data(seed: int, length: int = 120, episodes: int = 8) -> OfflineData:
    rng = np.random.default_rng(seed)
    trajs = [
        Trajectory(
            rng.normal(size=(length, 29)).astype(np.float32),
            rng.uniform(-1, 1, (length, 4)).astype(np.float32),
            -rng.uniform(0, 1, length).astype(np.float32),
        )
        for _ in range(episodes)
    ]
    return OfflineData(f"synthetic-{seed}", trajs, "")


def _vmap_vs_loop(model, batches, mean, repeats: int, label: str, case: str) -> tuple[list[dict], dict]:
    """Both methods, interleaved; rows for their medians, the ratio and the difference."""
    timing: dict[str, list[float]] = {"vmap": [], "loop": []}
    values = {}
    for _ in range(repeats):  # interleaved
        for method in timing:
            start = time.perf_counter()
            values[method] = fisher_diagonal(model, batches, mean, method=method, progress=False)
            timing[method].append(time.perf_counter() - start)
    diff = max(float((values["vmap"][n] - values["loop"][n]).abs().max()) for n in values["loop"])
    scale = max(float(v.abs().max()) for v in values["loop"].values())
    ms = {k: 1e3 * float(np.median(v)) for k, v in timing.items()}
    rows = [
        {"benchmark": "fisher", "case": f"{case}: vmap", "metric": "median_ms", "value": ms["vmap"], "unit": "ms"},
        {
            "benchmark": "fisher",
            "case": f"{case}: per-sample loop",
            "metric": "median_ms",
            "value": ms["loop"],
            "unit": "ms",
        },
        {
            "benchmark": "fisher",
            "case": f"{label}: per-sample loop / vmap (target >= 10)",
            "metric": "ratio",
            "value": ms["loop"] / ms["vmap"],
            "unit": "x",
        },
        {
            "benchmark": "fisher",
            "case": f"{label}: vmap vs loop, max abs difference / max value",
            "metric": "rel_diff",
            "value": diff / scale,
            "unit": "",
        },
    ]
    return rows, values


def run_mlp(repeats: int, quick: bool) -> list[dict]:
    samples = 64 if quick else SAMPLES
    model = _policy(0)
    obs = torch.randn(samples, 17, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    case = f"exact Gaussian Fisher, MLP policy ({params:,} params), {samples} samples"
    rows, _ = _vmap_vs_loop(model, list(obs.split(64)), lambda m, b: m(b), repeats, "MLP policy", case)
    return rows


def run_dt(repeats: int, quick: bool) -> list[dict]:
    samples = 16 if quick else DT_SAMPLES
    repeats = 2 if quick else repeats
    data = {"a": _data(0), "b": _data(1)}
    torch.manual_seed(0)
    model = build_model(data)
    sampler = window_sampler(model, "a", data["a"])
    batches = [sampler.sample(BATCH, np.random.default_rng(i)) for i in range(samples // BATCH)]

    def mean(m, b):
        out = m(b["states"], b["actions"], b["returns_to_go"], b["timesteps"], b["attention_mask"], task="a")
        return out.action_preds[:, -1]

    params = sum(p.numel() for p in model.parameters())
    case = f"exact Gaussian Fisher, Decision Transformer ({params:,} params), {samples} windows"
    rows, values = _vmap_vs_loop(model, batches, mean, repeats, "Decision Transformer", case)

    specialists = {t: specialist_from(model, t) for t in data}
    with torch.no_grad():
        for i, m in enumerate(specialists.values()):
            g = torch.Generator().manual_seed(i)
            for p in m.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    fishers = {"a": values["vmap"], "b": {n: v.flip(0) if v.dim() else v for n, v in values["vmap"].items()}}
    merge_ms = {}
    for method in ("average", "fisher", "task_arithmetic", "ties"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            merge_specialists(specialists, method, fishers=fishers, base=model)
            times.append(time.perf_counter() - start)
        merge_ms[method] = 1e3 * float(np.median(times))

    for method, value in merge_ms.items():
        rows.append(
            {
                "benchmark": "merge",
                "case": f"merge two DT specialists: {method}",
                "metric": "median_ms",
                "value": value,
                "unit": "ms",
            }
        )
    return rows


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    return run_mlp(repeats, quick) + run_dt(repeats, quick)


if __name__ == "__main__":
    from policies.benchmark import section_main

    raise SystemExit(section_main(run, __doc__))
