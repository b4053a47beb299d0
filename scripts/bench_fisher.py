"""Diagonal Fisher with ``torch.func`` (vmap over jacrev) versus a per-sample autograd
loop, same values; and the time to Fisher-merge two models.

The model is a policy-sized MLP (17-d observation -> 2 x 128 hidden -> 6 tanh actions,
~20k parameters, HalfCheetah's sizes), the exact Gaussian Fisher over 256 samples.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from adamoe import fisher_diagonal, merge

SAMPLES = 256


def _policy(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(17, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 6), nn.Tanh())


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    samples = 64 if quick else SAMPLES
    model = _policy(0)
    obs = torch.randn(samples, 17, generator=torch.Generator().manual_seed(0))
    batches = list(obs.split(64))
    mean = lambda m, b: m(b)
    timing: dict[str, list[float]] = {"vmap": [], "loop": []}
    values = {}
    for _ in range(repeats):  # interleaved
        for method in timing:
            start = time.perf_counter()
            values[method] = fisher_diagonal(model, batches, mean, method=method, progress=False)
            timing[method].append(time.perf_counter() - start)
    diff = max(float((values["vmap"][n] - values["loop"][n]).abs().max()) for n in values["loop"])
    scale = max(float(v.abs().max()) for v in values["loop"].values())

    other = _policy(1)
    fishers = [values["vmap"], fisher_diagonal(other, batches, mean, progress=False)]
    merge_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        merge([model.state_dict(), other.state_dict()], "fisher", fishers=fishers)
        merge_times.append(time.perf_counter() - start)

    case = (
        f"exact Gaussian Fisher, MLP policy ({sum(p.numel() for p in model.parameters()):,} params), {samples} samples"
    )
    ms = {k: 1e3 * float(np.median(v)) for k, v in timing.items()}
    return [
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
            "case": "per-sample loop / vmap (target >= 10)",
            "metric": "ratio",
            "value": ms["loop"] / ms["vmap"],
            "unit": "x",
        },
        {
            "benchmark": "fisher",
            "case": "vmap vs loop: max abs difference / max value",
            "metric": "rel_diff",
            "value": diff / scale,
            "unit": "",
        },
        {
            "benchmark": "merge",
            "case": "Fisher merge of two MLP policies",
            "metric": "median_ms",
            "value": 1e3 * float(np.median(merge_times)),
            "unit": "ms",
        },
    ]
