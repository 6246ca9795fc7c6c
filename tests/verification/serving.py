"""What the verification tests share: prompts, and one audit of a served (request, stage)."""

from __future__ import annotations

import torch

from bench.audit_calibration import StageRecord
from node.layer_reference import LayerAuditor
from verification.check import Outcome, check_stage
from verification.commitments import tensor_digest
from wire.messages import AuditTask, SamplingParams, dtype_name

# short prompts of 32-40 tokens (any ids of the vocabulary do: no tokenizer needed)
PROMPTS = [list(range(1000, 1040)), list(range(5000, 5072, 2))]
PROMPTS_8 = [list(range(300 + 997 * i, 300 + 997 * i + 32 + i)) for i in range(8)]
NEW_TOKENS = 8


def audit_record(auditor: LayerAuditor, rec: StageRecord, params: SamplingParams = SamplingParams(),
                 hardware_class: str = "") -> Outcome:
    """A verifier's audit of one (request, stage), through the production check_stage: the tensors
    the stage retained, held to the hashes its receipt would carry, every layer re-executed alone;
    `hardware_class`: the class the stage claims to have served on."""
    output = [rec.claimed()]
    if rec.shard.is_last:
        output += [torch.tensor(rec.positions, dtype=torch.int64), torch.tensor(rec.tokens, dtype=torch.int64)]
    stage_input, shard = rec.stage_input(), rec.shard
    task = AuditTask("audit", "request", "subject", (), shard.model_id, shard.start, shard.end, shard.n_layers,
                     tensor_digest([stage_input]), tensor_digest(output), tensor_digest([rec.trace]),
                     dtype_name(output[0].dtype), hardware_class, params, 0, b"")
    return check_stage(auditor, task, [stage_input, *output, rec.trace])
