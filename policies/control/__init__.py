"""The real-time control loop: a robot advancing with the clock, fixed-rate ticks, sync or
async chunk inference with merge rules, safety and telemetry."""

from policies.control.clock import RealClock, SimClock, SimExecutor, ThreadExecutor
from policies.control.loop import (
    MERGE_RULES,
    MODES,
    ActionPlan,
    ControlConfig,
    ControlLoop,
    ControlResult,
    SafetyFilter,
    format_summary,
)
from policies.control.robot import MujocoRobot, Robot

__all__ = [
    "MERGE_RULES",
    "MODES",
    "ActionPlan",
    "ControlConfig",
    "ControlLoop",
    "ControlResult",
    "MujocoRobot",
    "RealClock",
    "Robot",
    "SafetyFilter",
    "SimClock",
    "SimExecutor",
    "ThreadExecutor",
    "format_summary",
]
