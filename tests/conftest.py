import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import envs  # noqa: E402,F401  (registers the env ids and picks the GL backend before mujoco loads)

# Normalisation statistics for tiny test policies: state, action, and the environment
# state a scene encoder's targets come from.
TINY_STATS = {
    "observation.state": {"mean": np.zeros(4), "std": np.full(4, 0.1), "min": -np.ones(4), "max": np.ones(4)},
    "action": {"mean": np.zeros(4), "std": np.full(4, 0.5), "min": -np.ones(4), "max": np.ones(4)},
    "observation.environment_state": {
        "mean": np.full(25, 0.05),
        "std": np.full(25, 0.1),
        "min": -np.ones(25),
        "max": np.ones(25),
    },
}


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>`` as a user runs it (a separate Python process, from the repository
    root), capturing its output; ``check``: a non-zero exit fails with the output shown."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"scripts/{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ctrl_c_enabled_in_child() -> None:
    """``preexec_fn`` for a child a test interrupts: Ctrl-C at its default, as in a terminal.
    A command started in the background (``nohup``, ``&``) inherits SIGINT ignored, and
    Python then never raises ``KeyboardInterrupt``; a test of Ctrl-C must not depend on how
    the test run itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_enabled():
    """Ctrl-C raises ``KeyboardInterrupt`` in this process for the test (as in a terminal),
    however the test run was started; the previous handler comes back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
