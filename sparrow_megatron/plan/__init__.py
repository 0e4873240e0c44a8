"""Memory and time plan of a job: does each role fit on the GPU, and how long does a step take."""

from sparrow_megatron.plan.planner import DEVICE_BYTES, Plan, RolePlan, make_plan

__all__ = ["DEVICE_BYTES", "Plan", "RolePlan", "make_plan"]
