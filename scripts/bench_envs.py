"""Env stepping throughput: the tabletop suite against Meta-World, in one run."""

from __future__ import annotations

import time
import warnings

import gymnasium as gym
import numpy as np

import envs

TABLETOP = envs.tabletop_id("PickRed")
METAWORLD = envs.metaworld_id("pick-place-v3")
CAMERAS_TABLETOP = ("front", "wrist")
CAMERAS_METAWORLD = ("corner2", "gripperPOV")  # two 64x64 cameras, as for the tabletop


def _steps_per_second(env, steps: int, rng: np.random.Generator, vector: bool = False) -> float:
    env.reset(seed=int(rng.integers(1 << 30)))
    n = env.num_envs if vector else 1
    shape = (n, 4) if vector else (4,)
    actions = rng.uniform(-1, 1, size=(steps, *shape)).astype(np.float32)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if not vector and (terminated or truncated):
            env.reset()
    return steps * n / (time.perf_counter() - start)


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    """Median steps/s over ``repeats`` interleaved rounds of every case."""
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    steps = {"tabletop": 300 if quick else 1000, "vector": 150 if quick else 500, "metaworld": 40 if quick else 150}
    cases = {
        "tabletop, 1 env, 2x64x64 cameras": (gym.make(TABLETOP, cameras=CAMERAS_TABLETOP), steps["tabletop"], False),
        "tabletop, 1 env, state only": (gym.make(TABLETOP, cameras=()), steps["tabletop"], False),
        "tabletop, AsyncVectorEnv 2 procs, 2x64x64 cameras": (
            envs.make_vector_env([TABLETOP, envs.tabletop_id("StackBlueOnRed")], asynchronous=True),
            steps["vector"],
            True,
        ),
    }
    try:
        cases["metaworld pick-place, 1 env, 2x64x64 cameras"] = (
            gym.make(METAWORLD, cameras=CAMERAS_METAWORLD),
            steps["metaworld"],
            False,
        )
    except ImportError:
        pass
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for env, n, vector in cases.values():  # warm-up: contexts, worker start-up
        _steps_per_second(env, max(10, n // 10), rng, vector)
    for _ in range(repeats):
        for name, (env, n, vector) in cases.items():
            samples[name].append(_steps_per_second(env, n, rng, vector))
    for env, _, _ in cases.values():
        env.close()
    rows = [
        {
            "benchmark": "env_steps",
            "case": name,
            "metric": "steps_per_s",
            "value": float(np.median(v)),
            "unit": "steps/s",
        }
        for name, v in samples.items()
    ]
    mw = "metaworld pick-place, 1 env, 2x64x64 cameras"
    if mw in samples:
        ratios = np.array(samples["tabletop, 1 env, 2x64x64 cameras"]) / np.array(samples[mw])
        rows.append(
            {
                "benchmark": "env_steps",
                "case": "tabletop / metaworld, 2x64x64 cameras",
                "metric": "speedup",
                "value": float(np.median(ratios)),
                "unit": "x",
            }
        )
    return rows


if __name__ == "__main__":
    from policies.benchmark import section_main

    raise SystemExit(section_main(run, __doc__))
