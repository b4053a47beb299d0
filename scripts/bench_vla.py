"""``predict_action_chunk`` latency of the VLA policy: batch 1, 10 denoising steps.

The ``small`` preset (the default policy), dense and upcycled to AdaMoE (4 experts, top-1,
one shared expert), each with the prefix's keys and values cached once per chunk and
without (the whole sequence recomputed at every denoising step), in one interleaved run.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from policies import VLAPolicy, vla_config

STEPS = 10


def _batch(policy: VLAPolicy) -> dict:
    c = policy.config
    batch = {f"observation.images.{cam}": torch.rand(1, 3, c.image_size, c.image_size) for cam in c.cameras}
    batch["observation.state"] = torch.zeros(1, c.state_dim)
    batch["task"] = ["put the red cube on the purple pad"]
    return batch


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    dense = VLAPolicy(vla_config("small", num_inference_steps=STEPS)).eval()
    moe = VLAPolicy(vla_config("small", num_inference_steps=STEPS))
    moe.load_state_dict(dense.state_dict())
    moe.upcycle(init="paper")
    moe.eval()
    cases = {
        "small, dense, cached prefix": (dense, True),
        "small, dense, no cache": (dense, False),
        "small, AdaMoE, cached prefix": (moe, True),
        "small, AdaMoE, no cache": (moe, False),
    }
    batch = _batch(dense)
    calls = 10 if quick else 40
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for policy, cache in cases.values():
            for _ in range(3):
                policy.predict_action_chunk(batch, use_cache=cache)
        for _ in range(repeats):  # interleaved rounds; every call is one sample
            for name, (policy, cache) in cases.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    policy.predict_action_chunk(batch, use_cache=cache)
                    samples[name].append(time.perf_counter() - start)
    rows = []
    for name, values in samples.items():
        ms = 1e3 * np.array(values)
        for metric, value in (("median_ms", np.median(ms)), ("p99_ms", np.percentile(ms, 99))):
            rows.append(
                {
                    "benchmark": "vla_chunk",
                    "case": f"{name}, batch 1, {STEPS} steps",
                    "metric": metric,
                    "value": float(value),
                    "unit": "ms",
                }
            )
    for kind in ("dense", "AdaMoE"):
        ratio = np.median(samples[f"small, {kind}, cached prefix"]) / np.median(samples[f"small, {kind}, no cache"])
        rows.append(
            {
                "benchmark": "vla_chunk",
                "case": f"small, {kind}: cached / uncached",
                "metric": "ratio",
                "value": float(ratio),
                "unit": "x",
            }
        )
    return rows
