"""The VLA policy's speed: ``predict_action_chunk`` latency (batch 1, 10 denoising steps)
and training throughput.

The ``small`` preset (the default policy), dense and upcycled to AdaMoE (4 experts, top-1,
one shared expert), each with the prefix's keys and values cached once per chunk and
without (the whole sequence recomputed at every denoising step), in one interleaved run.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from envs.ids import tabletop_id
from policies import VLAPolicy, vla_config
from policies.constants import OBS_STATE, image_key

STEPS = 10


def _batch(policy: VLAPolicy) -> dict:
    c = policy.config
    batch = {image_key(cam): torch.rand(1, 3, c.image_size, c.image_size) for cam in c.cameras}
    batch[OBS_STATE] = torch.zeros(1, c.state_dim)
    batch["task"] = ["put the red cube on the purple pad"]
    return batch


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    return run_chunk(repeats, quick) + run_training(repeats, quick)


def run_chunk(repeats: int = 5, quick: bool = False) -> list[dict]:
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


def _train_step_rate(policy: VLAPolicy, sample, steps: int) -> float:
    """Samples per second of full training steps (forward, backward, AdamW) on ``sample()``."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy.train()
    batch = sample()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = policy(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch = sample()
    return steps * len(batch["task"]) / (time.perf_counter() - start)


# The small preset as it was before the recipe: the end-to-end conv stem, one learned vector
# per word position, no unknown-word insertion, width 128, 5 actions per chunk (the baseline
# the 3x throughput target is measured against).
PRE_RECIPE_SMALL = dict(
    vision="conv",
    word_positions="learned",
    word_insertion=0.0,
    prefix_width=128,
    expert_width=128,
    head_dim=32,
    n_action_steps=5,
)


def run_training(repeats: int = 5, quick: bool = False, batch_size: int = 64) -> list[dict]:
    """Training throughput, side by side, as a user's training loop runs it (batches drawn
    from a ``ChunkDataset`` of real demonstrations, then forward, backward, AdamW): the
    end-to-end conv stem on images with the random shift it trains with, against the
    recipe's model, whose frozen scene encoder's outputs are cached per frame. Also the
    model alone on batches made once (no data pipeline)."""
    import tempfile

    from envs.collection import CollectionJob, dataset_id_for, run_collection
    from policies.data import ChunkDataset
    from policies.vla.perception import encode_frames

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    conv = VLAPolicy(vla_config("small", **PRE_RECIPE_SMALL))
    scene = VLAPolicy(vla_config("small"))
    tasks = [tabletop_id("PickRed"), tabletop_id("PlaceBlueOnYellowPad")]
    with tempfile.TemporaryDirectory() as root:
        job = CollectionJob(
            env_ids=tasks, episodes_per_task=2 if quick else 4, noise_levels=(0.1,), root=root, workers=1
        )
        run_collection(job, progress=False)
        ids = [dataset_id_for(t) for t in tasks]
        images = ChunkDataset(ids, conv.config.chunk_size, conv.config.cameras, root=root, progress=False)
        cached = ChunkDataset(ids, scene.config.chunk_size, scene.config.cameras, root=root, progress=False)
    for policy, data in ((conv, images), (scene, cached)):
        policy.set_normalization(data.stats())
    cached.attach_frame_features(encode_frames(scene, cached.get, len(cached)))
    fixed = {name: data.sample(batch_size, rng, 4) for name, data in (("conv", images), ("scene", cached))}
    cases = {
        "small, vision=conv (end-to-end stem, images + shift)": (conv, lambda: images.sample(batch_size, rng, 4)),
        "small, vision=scene (recipe: frozen encoder, cached outputs)": (
            scene,
            lambda: cached.sample(batch_size, rng, 0, balance="task"),
        ),
        "model only: conv": (conv, lambda: fixed["conv"]),
        "model only: scene": (scene, lambda: fixed["scene"]),
    }
    steps = 3 if quick else 10
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for policy, sample in cases.values():
        _train_step_rate(policy, sample, 2)  # warm-up
    for _ in range(repeats):
        for name, (policy, sample) in cases.items():
            rates[name].append(_train_step_rate(policy, sample, steps))
    median = {name: float(np.median(values)) for name, values in rates.items()}
    rows = [
        {
            "benchmark": "vla_train",
            "case": f"{name}, batch {batch_size}",
            "metric": "samples_per_s",
            "value": value,
            "unit": "samples/s",
        }
        for name, value in median.items()
    ]
    names = list(median)
    for case, new, old in (
        ("recipe / conv stem, training loop (target >= 3)", names[1], names[0]),
        ("recipe / conv stem, model only", names[3], names[2]),
    ):
        rows.append(
            {"benchmark": "vla_train", "case": case, "metric": "ratio", "value": median[new] / median[old], "unit": "x"}
        )
    return rows


if __name__ == "__main__":
    from policies.benchmark import section_main

    raise SystemExit(section_main(run, __doc__))
