"""Offscreen camera rendering for every env that returns pixels.

The fast settings live here and only here: no shadows, no reflections, no skybox,
no multisampling and coarse tessellation. With MuJoCo's defaults a frame costs ~25 ms on this CPU (Mesa
llvmpipe); with these settings a 64x64 frame of the tabletop scene costs well under 1 ms.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from collections.abc import Sequence

import numpy as np


def ensure_gl_backend() -> str | None:
    """Default ``MUJOCO_GL`` to ``egl`` on a Linux machine without a display, and
    single-threaded software rasterising for the small frames policies use.

    Must run before ``mujoco`` is imported, because MuJoCo picks its OpenGL platform at
    import time. A value the user set is always kept.
    """
    if "MUJOCO_GL" not in os.environ and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"
    if os.environ.get("MUJOCO_GL") == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    if os.environ.get("MUJOCO_GL") in ("egl", "osmesa"):
        # Mesa's software rasteriser (llvmpipe) otherwise hands each frame to a pool of
        # worker threads; for 64x64 frames the hand-off costs more than the drawing:
        # rasterising in the calling thread makes a two-camera tabletop step ~1.4x
        # faster on 2 cores, and is no slower for Meta-World or 256x256 video frames
        # (measured). Ignored by hardware GL drivers.
        os.environ.setdefault("LP_NUM_THREADS", "0")
    return os.environ.get("MUJOCO_GL")


ensure_gl_backend()

import mujoco  # noqa: E402  (the GL backend must be chosen first)


def apply_fast_visuals(model: mujoco.MjModel, width: int, height: int) -> None:
    """Set the model-level visual options that must be fixed before a GL context exists."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    # Boxes are drawn as one quad a face and round geoms with few facets: at 64x64 the
    # difference is invisible, and the default 4x4 quads cost ~3x the render time (measured).
    model.vis.quality.numquads = 1
    model.vis.quality.numslices = min(int(model.vis.quality.numslices), 16)
    model.vis.quality.numstacks = min(int(model.vis.quality.numstacks), 8)
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)


class CameraRenderer:
    """Renders named cameras of one MuJoCo model into ``uint8 (H, W, 3)`` arrays.

    All cameras are drawn side by side into one offscreen framebuffer and read back with
    a single ``glReadPixels``: on a software rasteriser the read-back is a full pipeline
    sync, so one read per step instead of one per camera saves ~30% (measured on two
    64x64 cameras). ``flip`` names cameras whose image comes out upside down (Meta-World's
    corner cameras); they are rotated by 180 degrees so every image is upright.
    """

    def __init__(
        self,
        model: mujoco.MjModel,
        cameras: Sequence[str],
        height: int = 64,
        width: int = 64,
        flip: Sequence[str] = (),
    ) -> None:
        self.cameras = tuple(cameras)
        if not self.cameras:
            raise ValueError("CameraRenderer needs at least one camera")
        self.height, self.width = int(height), int(width)
        known = [model.camera(i).name for i in range(model.ncam)]
        for name in self.cameras:
            if name not in known:
                raise ValueError(f"unknown camera {name!r}; this model has cameras {known}")
        self._flip = [name in set(flip) for name in self.cameras]
        total_width = self.width * len(self.cameras)
        apply_fast_visuals(model, total_width, self.height)
        self._model = model
        self._gl = mujoco.GLContext(total_width, self.height)
        self._gl.make_current()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=max(1000, 4 * model.ngeom))
        for flag in FAST_SCENE_FLAGS_OFF:
            self._scene.flags[flag] = 0
        self._option = mujoco.MjvOption()
        self._perturb = mujoco.MjvPerturb()
        self._cams = []
        self._rects = []
        for i, name in enumerate(self.cameras):
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = model.camera(name).id
            self._cams.append(cam)
            self._rects.append(mujoco.MjrRect(i * self.width, 0, self.width, self.height))
        self._full = mujoco.MjrRect(0, 0, total_width, self.height)
        self._buffer = np.empty((self.height, total_width, 3), dtype=np.uint8)
        _track(self)

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        if self._gl is None:
            raise RuntimeError("this CameraRenderer is closed")
        self._gl.make_current()
        for cam, rect in zip(self._cams, self._rects, strict=True):
            mujoco.mjv_updateScene(
                self._model, data, self._option, self._perturb, cam, mujoco.mjtCatBit.mjCAT_ALL, self._scene
            )
            mujoco.mjr_render(rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._buffer, None, self._full, self._context)
        images = {}
        for i, name in enumerate(self.cameras):
            block = self._buffer[:, i * self.width : (i + 1) * self.width]
            # OpenGL rows run bottom-up: a vertical flip makes the image upright, and a
            # camera mounted upside down needs the horizontal flip as well.
            images[name] = np.ascontiguousarray(block[:, ::-1] if self._flip[i] else block[::-1])
        return images

    def close(self) -> None:
        gl, self._gl = getattr(self, "_gl", None), None
        if gl is None:
            return
        _LIVE.discard(self)
        try:
            gl.make_current()
            self._context.free()
            gl.free()
        except Exception:  # the process may be tearing down its GL platform already
            pass

    def __del__(self) -> None:
        self.close()


FAST_SCENE_FLAGS_OFF = (
    mujoco.mjtRndFlag.mjRND_SHADOW,
    mujoco.mjtRndFlag.mjRND_REFLECTION,
    mujoco.mjtRndFlag.mjRND_SKYBOX,
    mujoco.mjtRndFlag.mjRND_FOG,
    mujoco.mjtRndFlag.mjRND_HAZE,
)

# Renderers still open at exit are closed while EGL still works; closing them during
# interpreter teardown prints EGL errors (MuJoCo's own Renderer does). MuJoCo registers
# eglTerminate with atexit when it makes its first context, and atexit runs last-in
# first-out, so our hook is registered after that first context exists.
_LIVE: weakref.WeakSet[CameraRenderer] = weakref.WeakSet()
_HOOKED = False


def _track(renderer: CameraRenderer) -> None:
    global _HOOKED
    _LIVE.add(renderer)
    if not _HOOKED:
        atexit.register(_close_live_renderers)
        _HOOKED = True


def _close_live_renderers() -> None:
    for renderer in list(_LIVE):
        renderer.close()
