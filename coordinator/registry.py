"""Providers known to the coordinator: their signed profiles, liveness and whether they may serve.

Vouches are the operator's word that a provider may serve. They live in DATA_DIR/vouched (one peer
id a line) so that `coordinator vouch` works while the coordinator runs: the registry re-reads the
file when it changes. The other way to serve is earned: the ledger's record of a provider's audits
(its Standing, set here by the auditor) promotes a newcomer that agreed with the referee K times,
sends a slashed provider back to verifying, and bans a repeat offender. Either way it serves only
with the required stake locked (contracts.audits.may_serve): each planner round, `refresh` asks the
stake keeper (coordinator/stakes.py) to lock it for vouched peers and for those it alone holds back.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from contracts import DEFAULT_PARAMS, MoneyParams
from contracts.audits import Standing, may_serve

if TYPE_CHECKING:
    from coordinator.stakes import StakeKeeper

VOUCH_FILE = "vouched"
MAX_PROVIDERS = 1024


@dataclass
class ProviderRecord:
    peer: str
    profile: dict
    addrs: list[str]
    max_memory_bytes: int
    joined_s: float
    last_seen_s: float
    state: str = "newcomer"  # newcomer | idle | serving | leaving | dead | banned
    reason: str = ""
    rtt_ms: float | None = None  # round trip coordinator <-> provider, last measured (coordinator/reachability.py)
    # how it holds its links now, by peer: "direct", "hole-punched" or "relayed" (its last heartbeat)
    links: dict[str, str] = field(default_factory=dict)
    # why it may serve in float32 only: a same-recipe failure of its work nobody could confirm
    float32_only: str = ""

    @property
    def reachability(self) -> str:
        """How others dial it: "relayed" when it announced only /p2p-circuit addresses, else "public"
        (the planner prices hops by this; /pool refines it with `seen_reachability`)."""
        return "relayed" if self.addrs and all("/p2p-circuit" in a for a in self.addrs) else "public"

    def public(self, vouched: bool, reachability: str | None = None) -> dict:
        return {"peer": self.peer, "profile": self.profile, "vouched": vouched, "state": self.state,
                "max_memory_bytes": self.max_memory_bytes, "addrs": self.addrs,
                "reachability": reachability or self.reachability,
                "links": [{"peer": peer, "kind": kind} for peer, kind in sorted(self.links.items())],
                "float32_only": self.float32_only,
                "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3)}


def seen_reachability(record: ProviderRecord, records: list[ProviderRecord]) -> str:
    """public / hole-punched / relayed: a provider that announced only a relayed address is
    "hole-punched" once a link of its own, or a link another provider reports to it, is one that
    DCUtR made direct (node/transport/reach.py); only the two ends of a link can tell."""
    if record.reachability != "relayed":
        return record.reachability
    punched = "hole-punched" in record.links.values() or any(
        r.links.get(record.peer) == "hole-punched" for r in records if r.peer != record.peer and r.state != "dead")
    return "hole-punched" if punched else "relayed"


def add_vouch(data_dir: str | Path, peer: str) -> bool:
    """Record the operator's vouch for `peer`; False if it was already vouched."""
    path = Path(data_dir) / VOUCH_FILE
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    if peer in read_vouches(data_dir):
        return False
    with open(path, "a") as f:
        f.write(peer + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def read_vouches(data_dir: str | Path) -> set[str]:
    path = Path(data_dir) / VOUCH_FILE
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        return set()


class Registry:
    """Thread-safe: every record lives in `_providers` and changes under `lock`; readers get copies."""

    def __init__(self, data_dir: str | Path, heartbeat_timeout_s: float = 5.0, clock=time.monotonic,
                 params: MoneyParams = DEFAULT_PARAMS, stakes: "StakeKeeper | None" = None):
        """`stakes`: locks stakes in the ledger (without one, standings carry what tests set)."""
        self.data_dir, self.params, self.stakes = Path(data_dir), params, stakes
        self.standings: dict[str, Standing] = {}  # under lock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.lock = threading.RLock()
        self._providers: dict[str, ProviderRecord] = {}
        self._vouches: set[str] = set()
        self._vouch_mtime_ns = -1
        self._float32_only: dict[str, str] = {}  # peer -> why; kept across registrations

    def register(self, peer: str, profile: dict, addrs: list[str], max_memory_bytes: int) -> ProviderRecord:
        with self.lock:
            live = [p for p in self._providers.values() if p.state != "dead"]
            if peer not in self._providers and len(live) >= MAX_PROVIDERS:
                raise ValueError(f"the pool is full ({MAX_PROVIDERS} providers)")
            now = self.clock()
            if self.standings.get(peer, Standing()).banned:
                raise ValueError("this peer id is banned from the pool")
            old = self._providers.get(peer)
            live = old is not None and old.state not in ("dead", "banned") and now - old.last_seen_s <= \
                self.heartbeat_timeout_s
            if live and sorted(old.addrs) != sorted(addrs):
                # one key, two processes: streams would reach either one (node/transport/instance.py)
                raise ValueError(f"peer id {peer} is live in another process (at {', '.join(old.addrs)}); "
                                 "one peer id serves from one process")
            record = ProviderRecord(peer, profile, addrs, max_memory_bytes, joined_s=now, last_seen_s=now,
                                    float32_only=self._float32_only.get(peer, ""))
            self._providers[peer] = record
            record.state = "idle" if self.may_serve(peer) else "newcomer"
            if live and old.state in ("idle", "serving") and record.state == "idle":
                # the same process registering again (it lost us for a moment): its work goes on
                record.state, record.joined_s = old.state, old.joined_s
            return record

    def get(self, peer: str) -> ProviderRecord | None:
        """A copy of the provider's record, or None."""
        with self.lock:
            record = self._providers.get(peer)
            return None if record is None else replace(record)

    def records(self) -> list[ProviderRecord]:
        with self.lock:
            return [replace(p) for p in self._providers.values()]

    def standing(self, peer: str) -> Standing | None:
        with self.lock:
            return self.standings.get(peer)

    def may_serve(self, peer: str) -> bool:
        with self.lock:
            return may_serve(self.standings.get(peer, Standing()), self.params, self.is_vouched(peer))

    def set_standing(self, peer: str, standing: Standing) -> None:
        with self.lock:
            self.standings[peer] = standing

    def heartbeat(self, peer: str, links: dict[str, str] | None = None) -> bool:
        """A beat from `peer`, with how it holds its links now (None: leave what it said before)."""
        with self.lock:
            record = self._providers.get(peer)
            if record is None or record.state == "dead":
                return False
            record.last_seen_s = self.clock()
            if links is not None:
                record.links = dict(links)
            return True

    def restrict_to_float32(self, peer: str, reason: str) -> bool:
        """From now on `peer` serves in float32 (coordinator/precision.py): its low-precision work
        failed a check that nobody could confirm. Returns whether that is news."""
        with self.lock:
            if peer in self._float32_only:
                return False
            self._float32_only[peer] = reason
            if peer in self._providers:
                self._providers[peer].float32_only = reason
            return True

    def set_state(self, peer: str, state: str, reason: str = "") -> None:
        with self.lock:
            if peer in self._providers:
                self._providers[peer].state, self._providers[peer].reason = state, reason

    def expire(self) -> list[str]:
        """Mark providers silent for longer than the heartbeat timeout dead; return them."""
        with self.lock:
            now = self.clock()
            gone = [p.peer for p in self._providers.values()
                    if p.state not in ("dead",) and now - p.last_seen_s > self.heartbeat_timeout_s]
            for peer in gone:
                self.set_state(peer, "dead", "heartbeat timeout")
            return gone

    def is_vouched(self, peer: str) -> bool:
        with self.lock:
            self._refresh_vouches()
            return peer in self._vouches

    def lock_stakes(self) -> None:
        """Lock the stakes that can be locked now (vouched peers, promoted ones whose balance covers
        it) and take the standings the ledger has afterwards. Ledger calls run outside `lock`."""
        if self.stakes is None:
            return
        with self.lock:
            self._refresh_vouches()
            todo = [(p.peer, p.peer in self._vouches, self.standings.get(p.peer)) for p in self._providers.values()
                    if p.state in ("newcomer", "idle", "serving")
                    and self.stakes.may_lock(p.peer, self.standings.get(p.peer, Standing()), p.peer in self._vouches)]
        for peer, vouched, seen in todo:
            standing = self.stakes.ensure(peer, vouched)
            with self.lock:
                # the auditor may have set a standing meanwhile, from a read older than ours or not:
                # keep its one, and the next round, which finds the lock taken, reads again
                if standing is not None and self.standings.get(peer) is seen:
                    self.standings[peer] = standing

    def refresh(self) -> bool:
        """Lock the stakes that can be locked, promote newcomers now vouched for or promoted, send back
        those no longer allowed to serve, mark the banned; True if any changed."""
        self.lock_stakes()
        with self.lock:
            self._refresh_vouches()
            changed = False
            for record in self._providers.values():
                if record.state in ("dead", "leaving", "banned"):
                    continue
                allowed = self.may_serve(record.peer)
                new = ("banned" if self.standings.get(record.peer, Standing()).banned
                       else "idle" if allowed and record.state == "newcomer"
                       else "newcomer" if not allowed and record.state in ("idle", "serving") else record.state)
                if new != record.state:
                    record.state, record.reason, changed = new, "ledger standing", True
            return changed

    def candidates(self) -> list[ProviderRecord]:
        """Providers that may be given stages now."""
        with self.lock:
            self._refresh_vouches()
            return [replace(p) for p in self._providers.values() if p.state in ("idle", "serving")]

    def set_rtt(self, peer: str, rtt_ms: float) -> None:
        with self.lock:
            record = self._providers.get(peer)
            if record is not None:
                record.rtt_ms = rtt_ms

    def snapshot(self) -> list[dict]:
        with self.lock:
            self._refresh_vouches()
            records = list(self._providers.values())
            return [p.public(p.peer in self._vouches, seen_reachability(p, records)) for p in records]

    def _refresh_vouches(self) -> None:
        try:
            mtime = (self.data_dir / VOUCH_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            mtime = 0
        if mtime != self._vouch_mtime_ns:
            self._vouches, self._vouch_mtime_ns = read_vouches(self.data_dir), mtime
