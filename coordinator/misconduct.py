"""Misconduct: a signed profile that the coordinator's own measurement contradicts costs reputation.

The admission probe (coordinator/admission.py) times a newcomer on real layers with the coordinator's
clock; when that run takes more than the ledger's `misconduct_claim_ratio` times what the signed
profile predicts (coordinator/measurements.py decides it, with the same whole-number test the ledger
replays), the coordinator records one `misconduct` entry in the ledger: the provider loses
`reputation_penalty_per_misconduct` reputation (contracts/params.py says why that amount and why it
does not bench a first offender). One entry per contradicted claim: the op id names the signed profile
(its digest), so the same profile registered again (the provider lost the coordinator for a moment, or
the coordinator restarted and probes everyone again) costs nothing more, while a new profile that
measurement contradicts again (a provider restarted with another forged one) is another offence. Step
times never penalize (the stages report them, and contention moves them); they only re-plan.
"""

from __future__ import annotations

import hashlib
import json
import logging

from contracts.audits import Standing
from ledger.errors import IdempotencyConflict, LedgerError
from ledger.reader import LedgerReader
from ledger.service import LedgerService

log = logging.getLogger("meshpool.coordinator")


class MisconductRecorder:
    def __init__(self, ledger: LedgerService, reader: LedgerReader):
        self.ledger, self.reader = ledger, reader

    def contradicted_claim(self, peer: str, profile: dict, claim_ratio: float, detail: str) -> Standing | None:
        """Record that `peer`'s probe took `claim_ratio` x what its signed `profile` predicts; its standing
        afterwards (None when the ledger refused or holds no account for it: logged, nothing changed)."""
        ratio = int(claim_ratio)  # whole ratios: the ledger's meta holds no floats
        op_id = claim_op_id(peer, profile)
        evidence = {"claim_ratio": ratio, "threshold_ratio": self.ledger.params.misconduct_claim_ratio,
                    "source": "admission probe", "profile_sha256": op_id.rsplit(":", 1)[1]}
        try:
            result = self.ledger.record_misconduct(op_id, peer, f"signed profile contradicted: {detail}"[:200],
                                                   evidence)
            recorded = result.status == "created"
        except IdempotencyConflict:  # this claim was recorded already, from another probe of it
            recorded = False
        except LedgerError as exc:
            log.warning("misconduct of %s not recorded: %s", peer, exc)
            return None
        if recorded:
            log.warning("provider %s: profile contradicted by its probe (%dx); -%d reputation (ledger op %s)", peer,
                        ratio, self.ledger.params.reputation_penalty_per_misconduct, op_id)
        else:
            log.info("provider %s: profile contradicted again (%dx); that claim is already recorded", peer, ratio)
        return self.reader.standing(peer)


def claim_op_id(peer: str, profile: dict) -> str:
    """The ledger op id of one contradicted claim: the peer and its signed profile's digest."""
    digest = hashlib.sha256(json.dumps(profile, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"misconduct:{peer}:{digest[:32]}"
