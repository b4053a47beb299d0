"""How well the shipped VLA's scene encoder localises the cubes, on scenes rendered now.

Noisy scripted-expert rollouts of every tabletop task, from a seed block no collection of
the recipe uses; the encoder's own position head and a linear probe (ridge on the
encoder's features, fitted on three episodes in four, scored on the fourth) each give
median and 90th-percentile error per axis, for cubes resting on the table and for lifted
or held cubes. Targets: resting median <= 0.5 cm and p90 <= 1.2 cm, lifted median <= 1.5 cm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from envs.collection import collect, scene_seed
from envs.registration import resolve_env_ids
from policies import from_pretrained
from policies.constants import OBS_STATE, image_key
from policies.vla.perception import (
    SCENE_FEATURES,
    SCENE_POSITIONS,
    apply_linear_probe,
    encode_frames,
    fit_linear_probe,
    localisation_errors,
)
from policies.vla.recipe import LIFTED_Z

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "vla-tabletop-base"
PROBE_SEED = 90  # a job seed no recipe run uses (the recipe takes seed and seed + 1)
TARGETS = {("resting", "median_cm"): 0.5, ("resting", "p90_cm"): 1.2, ("lifted", "median_cm"): 1.5}


def _frames(episodes_per_task: int, noise: float) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {"front": [], "wrist": [], "state": [], "scene": [], "episode": []}
    count = 0
    for task_index, env_id in enumerate(resolve_env_ids(["tabletop"])):
        seeds = [scene_seed(PROBE_SEED, task_index, 0, i) for i in range(episodes_per_task)]
        for episode in collect(env_id, seeds, noise):
            obs = episode.buffer.observations
            for camera in ("front", "wrist"):
                parts[camera].append(obs["pixels"][camera])
            parts["state"].append(obs["agent_pos"])
            parts["scene"].append(obs["environment_state"])
            parts["episode"].append(np.full(len(obs["agent_pos"]), count))
            count += 1
    return {k: np.concatenate(v) for k, v in parts.items()}


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    if not (CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"no shipped checkpoint at {CHECKPOINT}: `make pretrain` and ship it first")
    policy = from_pretrained(CHECKPOINT)
    c = policy.config
    frames = _frames(4 if quick else 16, noise=0.3)

    def get(idx: np.ndarray) -> dict:
        batch = {
            image_key(cam): torch.from_numpy(frames[cam][idx]).permute(0, 3, 1, 2).float() / 255 for cam in c.cameras
        }
        return batch | {OBS_STATE: torch.from_numpy(frames["state"][idx]), "task": [""] * len(idx)}

    encoded = encode_frames(policy, get, len(frames["state"]))
    positions = policy.scene_target_norm.unnormalize(torch.from_numpy(encoded[SCENE_POSITIONS])).numpy()
    cubes = [i for i, g in enumerate(c.scene_objects) if len(g) == 3]
    columns = [sum(len(g) for g in c.scene_objects[:i]) + j for i in cubes for j in range(3)]
    state_columns = [c.scene_objects[i][j] for i in cubes for j in range(3)]
    true = frames["scene"][:, state_columns].reshape(-1, len(cubes), 3)
    lifted = true[..., 2] > LIFTED_Z
    probe_half = frames["episode"] % 4 == 0  # fit on three episodes in four, score on the fourth
    weights = fit_linear_probe(encoded[SCENE_FEATURES][~probe_half], frames["scene"][~probe_half][:, state_columns])
    read_out = apply_linear_probe(weights, encoded[SCENE_FEATURES][probe_half]).reshape(-1, len(cubes), 3)
    results = {
        "encoder head": localisation_errors(positions[:, columns].reshape(true.shape), true, lifted),
        "linear probe": localisation_errors(read_out, true[probe_half], lifted[probe_half]),
    }
    rows = []
    for reader, errors in results.items():
        for kind, row in errors.items():
            for metric in ("median_cm", "p90_cm", "x_median_cm", "y_median_cm", "z_median_cm"):
                target = TARGETS.get((kind, metric))
                case = f"{reader}, {kind} cubes ({row['count']:,})" + (f", target <= {target}" if target else "")
                rows.append(
                    {"benchmark": "perception", "case": case, "metric": metric, "value": row[metric], "unit": "cm"}
                )
    return rows


if __name__ == "__main__":
    from policies.benchmark import section_main

    raise SystemExit(section_main(run, __doc__))
