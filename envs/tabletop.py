"""The built-in tabletop manipulation env: one MuJoCo scene, a goal per task."""

from __future__ import annotations

import string
from importlib import resources
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.rendering import CameraRenderer, mujoco
from envs.tasks import (
    AGENT_DIM,
    CUBE_HALF,
    CUBES,
    FINGER_GAP_OPEN,
    INSTRUCTION_SPLITS,
    PADS,
    STATE_DIM,
    LongTask,
    SceneState,
    Task,
    get_task,
)

CAMERAS = ("front", "wrist")
# Characters an instruction may contain; gymnasium's Text space default is alphanumeric only.
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
INSTRUCTION_MAX_LENGTH = 128

ACTION_SCALE = 0.01  # metres of gripper displacement per unit action per step
MAX_LEAD = 0.02  # metres the commanded gripper position may run ahead of the hand
FRAME_SKIP = 4  # physics steps of 5 ms per control step: control at 50 Hz
WORKSPACE_LOW = np.array([-0.25, -0.2, 0.0])
WORKSPACE_HIGH = np.array([0.25, 0.25, 0.25])
# Spawn regions (x range, y range): cubes in front, pads behind.
CUBE_REGION = ((-0.16, 0.16), (-0.13, 0.05))
PAD_REGIONS = {"yellow": ((-0.2, -0.08), (0.1, 0.18)), "purple": ((0.08, 0.2), (0.1, 0.18))}
MIN_CUBE_SEPARATION = 0.09  # centre to centre: room for the fingers between any two cubes
GRIP_START = ((-0.05, 0.05), (-0.16, -0.12), (0.13, 0.17))
# A cube resting on the table has its centre at z = CUBE_HALF; one whose centre sinks this
# far below the table top has fallen off its edge (a tilted cube on the table stays above 0).
OFF_TABLE_DROP = 0.05


def load_scene() -> mujoco.MjModel:
    xml = resources.files("envs").joinpath("assets/tabletop.xml").read_text()
    return mujoco.MjModel.from_xml_string(xml)


class TabletopEnv(gym.Env):
    """A tabletop task behind the project's observation/action contract (docs/design.md).

    Observation: ``pixels`` (camera -> ``uint8 (H, W, 3)``, omitted when ``cameras`` is
    empty), ``agent_pos`` (grip point xyz, finger gap), ``environment_state`` (cube
    positions and quaternions, pad centres) and ``instruction``. Action: ``Box(-1, 1, (4,))``,
    the gripper displacement and the gripper command (-1 open, +1 closed).

    Reward: ``progress - 1`` with the task's shaped progress in [0, 1], so every step
    before success costs something and the return rewards solving the task quickly. The
    episode terminates on success (unless ``terminate_on_success=False``) and when a cube
    leaves the table (its centre more than ``OFF_TABLE_DROP`` below the table top, or
    outside the table top's x/y extent): no task can be solved from there, and a
    demonstration of it teaches nothing. The step limit comes from the registered
    ``max_episode_steps``.

    Every step's info holds ``termination_reason``: ``None`` while the episode goes on
    (truncation included), else ``"cube_off_table"`` or ``"success"``. A cube off the
    table names the termination even on a step that also succeeds, so a collector that
    drops such scenes drops them all.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1.0 / (0.005 * FRAME_SKIP)))}

    def __init__(
        self,
        task: str | Task | LongTask,
        cameras: tuple[str, ...] | list[str] = CAMERAS,
        image_size: int | tuple[int, int] = 64,
        instruction_split: str = "train",
        terminate_on_success: bool = True,
        render_mode: str | None = None,
        render_size: int | tuple[int, int] = 256,
    ) -> None:
        self.task = task if isinstance(task, (Task, LongTask)) else get_task(task)
        if instruction_split not in INSTRUCTION_SPLITS:
            raise ValueError(f"instruction_split={instruction_split!r}; valid: {INSTRUCTION_SPLITS}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; valid: {self.metadata['render_modes']} or None")
        if isinstance(cameras, str):
            raise ValueError(f"cameras={cameras!r} is a string; pass a tuple of camera names, e.g. ({cameras!r},)")
        self.cameras = tuple(cameras)
        for name in self.cameras:
            if name not in CAMERAS:
                raise ValueError(f"unknown camera {name!r}; valid cameras are {CAMERAS}")
        self.image_size = _size(image_size)
        self.render_size = _size(render_size)
        self.instruction_split = instruction_split
        self.terminate_on_success = terminate_on_success
        self.render_mode = render_mode

        self.model = load_scene()
        self.data = mujoco.MjData(self.model)
        self._instructions = self.task.instructions(instruction_split)
        self.instruction = self._instructions[0]

        m = self.model
        self._cube_qpos = [m.jnt_qposadr[m.joint(f"cube_{c}").id] for c in CUBES]
        self._cube_body = [m.body(f"cube_{c}").id for c in CUBES]
        self._pad_body = [m.body(f"pad_{p}").id for p in PADS]
        self._hand_qpos = m.jnt_qposadr[m.joint("hand").id]
        self._finger_qpos = [m.jnt_qposadr[m.joint(f"finger_{s}").id] for s in ("left", "right")]
        self._grip_site = m.site("grip").id
        self._mocap = m.body_mocapid[m.body("mocap").id]
        table = m.geom("table")  # a box: pos is its centre, size its half extents
        self._table_xy = (table.pos[:2] - table.size[:2], table.pos[:2] + table.size[:2])  # (low, high)
        self._table_top = float(table.pos[2] + table.size[2])

        obs_spaces: dict[str, spaces.Space] = {}
        if self.cameras:
            h, w = self.image_size
            obs_spaces["pixels"] = spaces.Dict({c: spaces.Box(0, 255, (h, w, 3), dtype=np.uint8) for c in self.cameras})
        obs_spaces["agent_pos"] = spaces.Box(-np.inf, np.inf, (AGENT_DIM,), dtype=np.float32)
        obs_spaces["environment_state"] = spaces.Box(-np.inf, np.inf, (STATE_DIM,), dtype=np.float32)
        obs_spaces["instruction"] = spaces.Text(INSTRUCTION_MAX_LENGTH, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)

        self._camera_renderer: CameraRenderer | None = None
        self._video_renderer: CameraRenderer | None = None

    # -- simulation ---------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)

        for body, (xr, yr) in zip(self._pad_body, (PAD_REGIONS[p] for p in PADS), strict=True):
            m.body_pos[body][:2] = rng.uniform(xr[0], xr[1]), rng.uniform(yr[0], yr[1])
        for adr, xy in zip(self._cube_qpos, _separated_points(rng, len(CUBES)), strict=True):
            yaw = rng.uniform(-0.3, 0.3)
            d.qpos[adr : adr + 3] = (*xy, CUBE_HALF)
            d.qpos[adr + 3 : adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        start = np.array([rng.uniform(*r) for r in GRIP_START])
        d.qpos[self._hand_qpos : self._hand_qpos + 3] = start
        d.qpos[self._hand_qpos + 3 : self._hand_qpos + 7] = (1.0, 0.0, 0.0, 0.0)
        d.mocap_pos[self._mocap] = start
        d.mocap_quat[self._mocap] = (1.0, 0.0, 0.0, 0.0)
        d.ctrl[:] = 0.0
        mujoco.mj_forward(m, d)

        self.instruction = self._instructions[int(rng.integers(len(self._instructions)))]
        obs = self._observation()
        return obs, self._info(self.scene_state())

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (4,):
            raise ValueError(f"action must have shape (4,) (dx, dy, dz, gripper), got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        action = np.clip(action, -1.0, 1.0)
        d = self.data
        target = d.mocap_pos[self._mocap] + action[:3] * ACTION_SCALE
        # The mocap target may lead the hand by at most MAX_LEAD: a blocked hand then
        # presses with a bounded force instead of winding up the weld spring.
        hand = d.qpos[self._hand_qpos : self._hand_qpos + 3]
        target = np.clip(target, hand - MAX_LEAD, hand + MAX_LEAD)
        d.mocap_pos[self._mocap] = np.clip(target, WORKSPACE_LOW, WORKSPACE_HIGH)
        d.ctrl[:] = 0.02 * (action[3] + 1.0)  # -1 -> 0 (open), +1 -> 0.04 (closed)
        mujoco.mj_step(self.model, d, nstep=FRAME_SKIP)

        state = self.scene_state()
        progress = self.task.progress(state)
        success = progress >= 1.0
        reason = None
        if self.cube_off_table():
            reason = "cube_off_table"
        elif success and self.terminate_on_success:
            reason = "success"
        info = {**self._info(state, success), "termination_reason": reason}
        return self._observation(), float(progress - 1.0), reason is not None, False, info

    def cube_off_table(self) -> bool:
        """Some cube's centre is below the table top by ``OFF_TABLE_DROP`` or outside its x/y extent."""
        low, high = self._table_xy
        for body in self._cube_body:
            pos = self.data.xpos[body]
            if pos[2] < self._table_top - OFF_TABLE_DROP or np.any(pos[:2] < low) or np.any(pos[:2] > high):
                return True
        return False

    def scene_state(self) -> SceneState:
        return SceneState.from_arrays(self._agent_pos(), self._environment_state())

    def _agent_pos(self) -> np.ndarray:
        grip = self.data.site_xpos[self._grip_site]
        closing = sum(self.data.qpos[a] for a in self._finger_qpos)
        return np.array([*grip, FINGER_GAP_OPEN - closing], dtype=np.float32)

    def _environment_state(self) -> np.ndarray:
        d = self.data
        pos = [d.xpos[b] for b in self._cube_body]
        quat = [d.xquat[b] for b in self._cube_body]
        pads = [self.model.body_pos[b][:2] for b in self._pad_body]
        return np.concatenate(pos + quat + pads).astype(np.float32)

    def _observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = {}
        if self.cameras:
            if self._camera_renderer is None:
                h, w = self.image_size
                self._camera_renderer = CameraRenderer(self.model, self.cameras, h, w)
            obs["pixels"] = self._camera_renderer.render(self.data)
        obs["agent_pos"] = self._agent_pos()
        obs["environment_state"] = self._environment_state()
        obs["instruction"] = self.instruction
        return obs

    def _info(self, state: SceneState, success: bool | None = None) -> dict[str, Any]:
        if success is None:
            success = self.task.success(state)
        return {
            "is_success": bool(success),
            "instruction": self.instruction,
            "task": self.task.name,
            "stages_done": self.task.stages_done(state),  # long tasks: the stages that hold, in order
            "num_stages": len(self.task.stages),
        }

    # -- rendering ----------------------------------------------------------------

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._video_renderer is None:
            h, w = self.render_size
            self._video_renderer = CameraRenderer(self.model, ("front",), h, w)
        return self._video_renderer.render(self.data)["front"]

    def close(self) -> None:
        for name in ("_camera_renderer", "_video_renderer"):
            renderer = getattr(self, name, None)
            if renderer is not None:
                renderer.close()
                setattr(self, name, None)


MAX_IMAGE_SIZE = 1024  # a render larger than this per camera is a typo, not a wish (1024^2 x 3 bytes each)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` or ``(height, width)`` as two ints in [1, MAX_IMAGE_SIZE]."""
    pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {size!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIZE for v in pair):
        raise ValueError(f"image size must be whole pixels in [1, {MAX_IMAGE_SIZE}], got {size!r}")
    return int(pair[0]), int(pair[1])


def _separated_points(rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
    """``n`` cube positions in the spawn region, pairwise at least MIN_CUBE_SEPARATION apart."""
    (x0, x1), (y0, y1) = CUBE_REGION
    for _ in range(1000):
        pts = rng.uniform((x0, y0), (x1, y1), size=(n, 2))
        gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(n)
        if gaps.min() >= MIN_CUBE_SEPARATION:
            return [tuple(p) for p in pts]
    raise RuntimeError("could not place the cubes; the spawn region is too small")
