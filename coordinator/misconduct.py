"""Misconduct: a signed profile that the coordinator's own measurement contradicts costs reputation.

The admission probe (coordinator/admission.py) times a newcomer on real layers with the coordinator's
clock; when that run takes more than the ledger's `misconduct_claim_ratio` times what the signed
profile predicts (coordinator/measurements.py decides it, with the same whole-number test the ledger
replays), the coordinator records one `misconduct` entry in the ledger: the provider loses
`reputation_penalty_per_misconduct` reputation (contracts/params.py says why that amount and why it
does not bench a first offender). One entry per contradicted registration: a registration is probed
once, and the op id names that probe, so a retry writes nothing twice. Step times never penalize
(the stages report them, and contention moves them); they only re-plan.
"""

from __future__ import annotations

import logging
import secrets

from contracts.audits import Standing
from ledger.errors import LedgerError
from ledger.reader import LedgerReader
from ledger.service import LedgerService

log = logging.getLogger("meshpool.coordinator")


class MisconductRecorder:
    def __init__(self, ledger: LedgerService, reader: LedgerReader):
        self.ledger, self.reader = ledger, reader

    def contradicted_claim(self, peer: str, claim_ratio: float, detail: str) -> Standing | None:
        """Record that `peer`'s probe took `claim_ratio` x its claim; its standing afterwards (None when
        the ledger refused or holds no account for it: logged, nothing changed)."""
        ratio = int(claim_ratio)  # whole ratios: the ledger's meta holds no floats
        op_id = f"misconduct:{peer}:{secrets.token_hex(8)}"  # this probe of this registration
        evidence = {"claim_ratio": ratio, "threshold_ratio": self.ledger.params.misconduct_claim_ratio,
                    "source": "admission probe"}
        try:
            self.ledger.record_misconduct(op_id, peer, f"signed profile contradicted: {detail}"[:200], evidence)
        except LedgerError as exc:
            log.warning("misconduct of %s not recorded: %s", peer, exc)
            return None
        standing = self.reader.standing(peer)
        log.warning("provider %s: profile contradicted by its probe (%dx); -%d reputation (ledger op %s)", peer,
                    ratio, self.ledger.params.reputation_penalty_per_misconduct, op_id)
        return standing
