"""Meta-World v3 tasks behind the project's observation/action contract.

Meta-World is an optional extra (``pip install 'adamoe[metaworld]'``): importing this
module never imports it; making an env or expert without it raises an error that says
how to install it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.experts import ScriptedExpert
from envs.rendering import CameraRenderer, mujoco
from envs.tabletop import INSTRUCTION_CHARSET, INSTRUCTION_MAX_LENGTH

INSTALL_HINT = "Meta-World is an optional extra: install it with  pip install 'adamoe[metaworld]'  (or make setup)"

# One instruction per task, in the imperative of the tabletop suite.
METAWORLD_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "move the puck from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "use the stick to push the bottle",
    "stick-pull-v3": "use the stick to pull the bottle",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal around the wall",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position over the wall",
    "shelf-place-v3": "put the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

# The MT10 benchmark's tasks (Yu et al., Meta-World).
MT10 = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

METAWORLD_OBS_DIM = 39  # hand (4), two objects (7 + 7), the previous frame of those (18), goal (3)


def _import_metaworld():
    try:
        import metaworld.env_dict
        import metaworld.policies
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return metaworld


def _check_task(task: str) -> None:
    if task not in METAWORLD_INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task {task!r}; valid tasks are {sorted(METAWORLD_INSTRUCTIONS)}")


class MetaWorldEnv(gym.Env):
    """A Meta-World v3 task with fresh object and goal positions at every reset.

    ``pixels`` come from the named cameras, upright (cameras mounted upside down are
    detected from their pose and rotated); ``agent_pos`` is the hand position and gripper
    opening (the first 4 entries of Meta-World's state); ``environment_state`` is the full
    39-d state with the goal visible, which Meta-World's scripted policies read.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task: str,
        cameras: tuple[str, ...] | list[str] = ("corner2",),
        image_size: int | tuple[int, int] = 64,
        terminate_on_success: bool = True,
        render_mode: str | None = None,
        render_size: int | tuple[int, int] = 256,
        render_camera: str = "corner2",
    ) -> None:
        _check_task(task)
        mw = _import_metaworld()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; valid: {self.metadata['render_modes']} or None")
        self.task = task
        self.instruction = METAWORLD_INSTRUCTIONS[task]
        self.cameras = tuple(cameras)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.render_size = (render_size, render_size) if isinstance(render_size, int) else tuple(render_size)
        self.render_camera = render_camera
        self.render_mode = render_mode
        self.terminate_on_success = terminate_on_success

        inner = mw.env_dict.ALL_V3_ENVIRONMENTS[task]()
        # What Meta-World's goal-observable variants do, without their global-RNG reseeding:
        # a new random object/goal layout at every reset, drawn from the env's own generator.
        inner._partially_observable = False
        inner._freeze_rand_vec = False
        inner.seeded_rand_vec = True
        inner._set_task_called = True
        # The observation bounds are cached with the goal hidden (zero bounds), and step()
        # clips to them: drop the cache so the visible goal survives the clip.
        inner.__dict__.pop("sawyer_observation_space", None)
        self._inner = inner
        known = [inner.model.camera(i).name for i in range(inner.model.ncam)]
        for name in (*self.cameras, render_camera):
            if name not in known:
                raise ValueError(f"unknown camera {name!r}; Meta-World cameras are {known}")

        obs_spaces: dict[str, spaces.Space] = {}
        if self.cameras:
            h, w = self.image_size
            obs_spaces["pixels"] = spaces.Dict({c: spaces.Box(0, 255, (h, w, 3), dtype=np.uint8) for c in self.cameras})
        obs_spaces["agent_pos"] = spaces.Box(-np.inf, np.inf, (4,), dtype=np.float32)
        obs_spaces["environment_state"] = spaces.Box(-np.inf, np.inf, (METAWORLD_OBS_DIM,), dtype=np.float32)
        obs_spaces["instruction"] = spaces.Text(INSTRUCTION_MAX_LENGTH, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self._camera_renderer: CameraRenderer | None = None
        self._video_renderer: CameraRenderer | None = None
        self._state = np.zeros(METAWORLD_OBS_DIM)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._inner.seed(int(self.np_random.integers(2**31 - 1)))
        # Meta-World's reset settles the hand by simulating from wherever the last episode
        # left it; starting from clean data makes a reset a function of the seed alone.
        mujoco.mj_resetData(self._inner.model, self._inner.data)
        state, _ = self._inner.reset()
        mujoco.mj_forward(self._inner.model, self._inner.data)  # reset moves goal sites after its last forward
        self._state = state
        return self._observation(), {"is_success": False, "instruction": self.instruction, "task": self.task}

    def step(self, action):
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (4,):
            raise ValueError(f"action must have shape (4,) (dx, dy, dz, gripper), got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        state, reward, _, _, info = self._inner.step(np.clip(action, -1.0, 1.0))
        self._state = state
        success = bool(info.get("success", 0.0))
        out = {"is_success": success, "instruction": self.instruction, "task": self.task}
        return self._observation(), float(reward), bool(success and self.terminate_on_success), False, out

    def _observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = {}
        if self.cameras:
            if self._camera_renderer is None:
                self._camera_renderer = self._renderer(self.cameras, self.image_size)
            obs["pixels"] = self._camera_renderer.render(self._inner.data)
        obs["agent_pos"] = self._state[:4].astype(np.float32)
        obs["environment_state"] = self._state.astype(np.float32)
        obs["instruction"] = self.instruction
        return obs

    def _renderer(self, cameras: tuple[str, ...], size: tuple[int, int]) -> CameraRenderer:
        model, data = self._inner.model, self._inner.data
        mujoco.mj_forward(model, data)
        # A camera whose image-up axis points below the horizon renders upside down.
        upside_down = [c for c in cameras if data.cam_xmat[model.camera(c).id].reshape(3, 3)[2, 1] < 0]
        return CameraRenderer(model, cameras, size[0], size[1], flip=upside_down)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._video_renderer is None:
            self._video_renderer = self._renderer((self.render_camera,), self.render_size)
        return self._video_renderer.render(self._inner.data)[self.render_camera]

    def close(self) -> None:
        for name in ("_camera_renderer", "_video_renderer"):
            renderer = getattr(self, name, None)
            if renderer is not None:
                renderer.close()
                setattr(self, name, None)
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.close()


class MetaWorldExpert(ScriptedExpert):
    """Meta-World's own scripted policy for a task, with the same noise options as ours."""

    def __init__(self, task: str, noise: float = 0.0, random_action_prob: float = 0.0, seed: int | None = None):
        _check_task(task)
        self.task = task
        self.policy = _import_metaworld().policies.ENV_POLICY_MAP[task]()
        super().__init__(noise, random_action_prob, seed)

    def _clean_action(self, obs: dict) -> np.ndarray:
        return np.asarray(self.policy.get_action(np.asarray(obs["environment_state"], dtype=np.float64)))
