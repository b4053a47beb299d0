"""The real-time control loop: a robot advancing with the clock, fixed-rate ticks, sync or
async chunk inference with merge rules, safety and telemetry."""

from policies.control.clock import RealClock, SimClock, SimExecutor, ThreadExecutor
from policies.control.config import MERGE_RULES, MODES, ControlConfig
from policies.control.loop import ControlLoop, stop_on_interrupt
from policies.control.plan import ActionPlan
from policies.control.robot import MujocoRobot, Robot
from policies.control.safety import SafetyFilter
from policies.control.telemetry import ControlResult, Telemetry, format_summary

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
    "Telemetry",
    "ThreadExecutor",
    "format_summary",
    "stop_on_interrupt",
]
