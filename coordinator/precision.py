"""Which precision each stage serves in (DESIGN decision 5: the coordinator decides, the stage's
receipt commits to it, anything else fails its audit).

float32 is checked completely by any verifier: against a float32 reference every cheaper copy of
the weights fails. bfloat16 halves the memory and the bytes read per token, but a fine copy (8-bit
weights, a 1e-3 tamper) hides inside bfloat16's own rounding from a float32 reference; only
verifiers of the stage's own hardware class see it, by re-running its recipe, and what they find
counts when two of them agree (coordinator/audits.py). So a provider that asks for bfloat16 gets
it when its class has measured same-recipe thresholds (verification/layer_compare.py) and at least
WITNESSES other live providers of that class; otherwise it serves float32. A provider whose
low-precision work failed a same-recipe check that no second witness confirmed serves float32
from then on: what cannot be settled in bfloat16 is settled in float32, where any verifier sees
everything. An operator may force one precision for every stage instead (`coordinator serve
--serving-dtype`).
"""

from __future__ import annotations

import torch

from coordinator.registry import ProviderRecord
from verification.layer_compare import same_recipe_thresholds
from wire.messages import SERVING_DTYPES

WITNESSES = 2  # a same-recipe verifier, and a second one to confirm what it finds
LIVE_STATES = ("newcomer", "idle", "serving")


def verifiable(record: ProviderRecord, dtype: str, records: list[ProviderRecord]) -> bool:
    """Whether every cheaper copy of a `dtype` stage on this provider's hardware can be caught."""
    if dtype == "float32":
        return True
    hardware_class = record.profile.get("hardware_class")
    if not isinstance(hardware_class, str) or not hardware_class:
        return False
    if same_recipe_thresholds(hardware_class.split("/", 1)[0], getattr(torch, dtype)) is None:
        return False
    witnesses = [r for r in records if r.peer != record.peer and r.state in LIVE_STATES
                 and r.profile.get("hardware_class") == hardware_class]
    return len(witnesses) >= WITNESSES


def serving_dtype(record: ProviderRecord | None, records: list[ProviderRecord], forced: str = "") -> str:
    """The precision `record` is assigned: `forced` if the operator set one, else what its profile
    asks for when that can be verified, else float32."""
    if forced:
        return forced
    wanted = record.profile.get("serving_dtype") if record else None
    if wanted not in SERVING_DTYPES or record.float32_only:
        return "float32"
    return wanted if verifiable(record, wanted, records) else "float32"
