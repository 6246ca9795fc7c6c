"""The pipeline planner: asymmetric layer placement over a heterogeneous pool from a cost model.

Pure functions of typed values: no I/O, no clock.
"""

from coordinator.planner.baselines import equal_split, memory_proportional
from coordinator.planner.capacity import (MIN_CONTEXT_TOKENS, Capacity, bent_workloads, plan_within_memory,
                                          sessions_held)
from coordinator.planner.cost import evaluate_pipeline, max_layers, served_model, stage_memory_bytes, stage_time_s
from coordinator.planner.hysteresis import choose as choose_with_hysteresis
from coordinator.planner.hysteresis import score as plan_score
from coordinator.planner.hardware import (COORDINATOR, Link, Links, ProfileError, ProviderSpec,
                                          provider_spec_from_profile)
from coordinator.planner.placement import minimum_memory_bytes, plan
from coordinator.planner.shapes import LLAMA3_8B, LLAMA3_70B, SMOLLM2_135M, ModelShape
from coordinator.planner.split import Split, SplitSolver
from coordinator.planner.values import (InsufficientMemoryError, Objective, Pipeline, PipelineCost, Plan, PlanError,
                                        Stage, Workload)

__all__ = [
    "MIN_CONTEXT_TOKENS", "Capacity", "bent_workloads", "plan_within_memory", "sessions_held",
    "COORDINATOR", "LLAMA3_8B", "LLAMA3_70B", "SMOLLM2_135M", "InsufficientMemoryError", "Link", "Links",
    "ModelShape", "Objective", "Pipeline", "PipelineCost", "Plan", "PlanError", "ProfileError", "ProviderSpec",
    "Split", "SplitSolver", "Stage", "Workload", "choose_with_hysteresis", "plan_score", "equal_split",
    "evaluate_pipeline",
    "max_layers", "memory_proportional", "minimum_memory_bytes", "plan", "provider_spec_from_profile",
    "served_model", "stage_memory_bytes",
    "stage_time_s",
]
