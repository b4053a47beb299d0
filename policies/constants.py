"""Batch keys: the LeRobot feature names every policy, dataset and script here uses."""

OBS_STATE = "observation.state"  # (B, state_dim) proprioception (the env's ``agent_pos``)
OBS_ENV_STATE = "observation.environment_state"  # (B, k) privileged object state; never a VLA input
OBS_IMAGES = "observation.images"  # prefix of ``observation.images.<camera>``: (B, 3, H, W) floats in [0, 1]
ACTION = "action"  # (B, H, action_dim) the chunk to predict
TASK = "task"  # list of B instruction strings
# The frozen scene encoder's outputs, cached per frame (policies/vla/perception.py).
SCENE_POSITIONS = "observation.scene.positions"
SCENE_FEATURES = "observation.scene.features"


def image_key(camera: str) -> str:
    """``observation.images.<camera>``."""
    return f"{OBS_IMAGES}.{camera}"
