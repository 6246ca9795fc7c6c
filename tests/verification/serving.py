"""What the verification tests share: prompts, and one audit of a served (request, stage)."""

from __future__ import annotations

from bench.audit_calibration import StageRecord
from node.sampling import SamplingParams
from verification.compare import Verdict, combine, compare_hidden, compare_tokens
from verification.recompute import Recomputer

# short prompts of 32-40 tokens (any ids of the vocabulary do: no tokenizer needed)
PROMPTS = [list(range(1000, 1040)), list(range(5000, 5072, 2))]
PROMPTS_8 = [list(range(300 + 997 * i, 300 + 997 * i + 32 + i)) for i in range(8)]
NEW_TOKENS = 8


def audit_record(recomputer: Recomputer, rec: StageRecord, params: SamplingParams = SamplingParams()) -> Verdict:
    """A verifier's audit of one (request, stage): one prefill over its inputs, then compare."""
    claimed = rec.claimed()
    hidden, logits = recomputer.run(rec.shard, claimed.dtype, rec.stage_input())
    verdict = compare_hidden(claimed, hidden, claimed.dtype)
    if logits is not None:
        tokens = compare_tokens(logits[rec.sampled_rows()], rec.tokens, rec.positions, params, claimed.dtype)
        verdict = combine(verdict, tokens)
    return verdict
