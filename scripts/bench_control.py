"""The real-time control loop at 50 Hz with the default AdaMoE policy on a tabletop task:
async versus sync inference, 3000 ticks each, in one run.

The policy is the ``small`` VLA upcycled to AdaMoE (paper defaults), from
``outputs/demo/checkpoints/adamoe`` when ``make demo`` has produced it, else freshly
built (the same compute). Timing rows: p99 tick jitter (and as a fraction of the
period), deadline misses, starved ticks, inference latency.
"""

from __future__ import annotations

from pathlib import Path

import torch

from policies import VLAPolicy, from_pretrained, vla_config
from policies.control.config import ControlConfig
from policies.control.runner import run_policy

TICKS = 3000
RATE = 50.0
CHECKPOINT = Path("outputs/demo/checkpoints/adamoe")


def _policy() -> tuple[VLAPolicy, str]:
    if (CHECKPOINT / "model.safetensors").is_file():
        return from_pretrained(CHECKPOINT), f"trained ({CHECKPOINT})"
    torch.manual_seed(0)
    policy = VLAPolicy(vla_config("small"))
    policy.upcycle(init="paper")
    return policy.eval(), "untrained weights, same compute"


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    ticks = 300 if quick else TICKS
    policy, source = _policy()
    rows = []
    for mode in ("async", "sync"):
        config = ControlConfig(rate_hz=RATE, mode=mode, max_ticks=ticks, stop_on_done=False)
        s = run_policy(policy, "PickRed", config, seed=0, endless=True).summary
        case = f"{mode}, AdaMoE small VLA ({source}), {RATE:g} Hz, {s['ticks']} ticks"
        rows += [
            {
                "benchmark": "control",
                "case": case,
                "metric": "p99_jitter_ms",
                "value": s["jitter_ms"]["p99"],
                "unit": "ms",
            },
            {
                "benchmark": "control",
                "case": case,
                "metric": "p99_jitter / period (target <= 0.10 async)",
                "value": s["jitter_p99_fraction_of_period"],
                "unit": "x",
            },
            {
                "benchmark": "control",
                "case": case,
                "metric": "deadline_misses (target 0 async)",
                "value": s["deadline_misses"],
                "unit": "ticks",
            },
            {
                "benchmark": "control",
                "case": case,
                "metric": "starved_ticks",
                "value": s["starved_ticks"],
                "unit": "ticks",
            },
            {
                "benchmark": "control",
                "case": case,
                "metric": "median_inference_ms",
                "value": s["inference_latency_ms"]["median"],
                "unit": "ms",
            },
        ]
    return rows


if __name__ == "__main__":
    from policies.benchmark import section_main

    raise SystemExit(section_main(run, __doc__))
