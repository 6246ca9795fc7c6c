"""The dashboard's one JSON document: the pool as a person sees it, rebuilt at most every CACHE_S.

Sources: `pool.snapshot()` (providers and pipelines, as `GET /pool` gives them), the app's
`Metrics` (tokens/s, steps, requests in flight, time to first token) and the ledger through
`LedgerView` (standing, stake and earnings of providers; audits, slashes, head, checkpoint, supply).
Strings a provider chose (its device name in the signed profile) are cut to MAX_TEXT characters;
the page shows them as text, never as HTML. No consumer account, key or key hash is read.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time

log = logging.getLogger("meshpool.dashboard")

CACHE_S = 0.5
MAX_TEXT = 80
MAX_DEAD_SHOWN = 50


def _text(value) -> str:
    return str(value)[:MAX_TEXT] if value is not None else ""


def _number(value, default=None):
    """A finite number from a provider's profile, else `default` (NaN is not JSON a browser reads)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else default


def device_summary(profile: dict) -> dict:
    """The first device of a signed hardware profile, as a few readable figures."""
    profile = profile if isinstance(profile, dict) else {}
    devices = profile.get("devices") if isinstance(profile.get("devices"), list) else []
    device = devices[0] if devices and isinstance(devices[0], dict) else {}
    host = profile.get("host") if isinstance(profile.get("host"), dict) else {}
    kind = _text(device.get("kind", "?"))
    index = _number(device.get("index"), 0)
    name = _text(device.get("name") or host.get("cpu_model") or "")
    total = _number(device.get("memory_total_bytes"), 0)
    return {"device": f"{kind}:{index}" if kind != "cpu" else "cpu", "name": name,
            "memory_gb": round(total / 2**30, 1), "bandwidth_gb_per_s": _number(device.get("mem_bandwidth_gb_per_s")),
            "matmul_tflops": _number(device.get("matmul_tflops")), "dtype": _text(device.get("dtype", "")),
            "cpu_cores": _number(host.get("cpu_cores"))}


class DashboardState:
    def __init__(self, pool, model_id: str, n_layers: int, metrics, ledger_view=None, clock=time.monotonic):
        self.pool, self.model_id, self.n_layers = pool, model_id, n_layers
        self.metrics, self.ledger_view, self.clock = metrics, ledger_view, clock
        self._lock = threading.Lock()
        self._cached: dict | None = None
        self._cached_at = -1e9

    def build(self) -> dict:
        with self._lock:
            if self._cached is None or self.clock() - self._cached_at >= CACHE_S:
                self._cached, self._cached_at = self._build(), self.clock()
            return self._cached

    def _build(self) -> dict:
        snapshot = self.pool.snapshot()
        rates = self.metrics.rates()
        pipelines = []
        for p in snapshot.get("pipelines", []):
            rate = rates.get(p["id"], {})
            pipelines.append({"id": p["id"], "stages": [{"peer": s["peer"], "start": s["start"], "end": s["end"]}
                                                        for s in p["stages"]],
                              "tokens_per_s": round(rate.get("tokens_per_s", 0.0), 2), "step_ms": rate.get("step_ms"),
                              # what its stages hold: sessions decoded at once and the context of each
                              "max_sessions": p.get("max_sessions"), "context_tokens": p.get("context_tokens")})
        n_layers = self.n_layers or max((s["end"] for p in pipelines for s in p["stages"]), default=0)

        live = [p for p in snapshot.get("providers", []) if p.get("state") != "dead"]
        dead = [p for p in snapshot.get("providers", []) if p.get("state") == "dead"][-MAX_DEAD_SHOWN:]
        ledger, standings = None, {}
        if self.ledger_view is not None:
            try:
                ledger = self.ledger_view.summary()
                standings = self.ledger_view.standings([p["peer"] for p in live + dead])
            except Exception as exc:  # the page still shows the pool when the ledger cannot be read
                log.warning("dashboard: reading the ledger failed: %s", exc)
        stages_of: dict[str, list[list[int]]] = {}
        for p in pipelines:
            for s in p["stages"]:
                stages_of.setdefault(s["peer"], []).append([s["start"], s["end"]])
        benched = {b["peer"]: b for b in snapshot.get("benched", []) if b.get("benched")}
        providers = []
        for p in live + dead:
            standing = standings.get(p["peer"], {})
            state = "banned" if standing.get("banned") else _text(p.get("state", ""))
            bench = benched.get(p["peer"])
            if bench is not None and state not in ("banned", "dead"):
                state = "benched"  # out of the plan for a while after failing steps (coordinator/backoff.py)
            providers.append({"peer": p["peer"], "state": state, "vouched": bool(p.get("vouched")),
                              "max_memory_mb": int(_number(p.get("max_memory_bytes"), 0) // 2**20),
                              "reachability": _text(p.get("reachability", "")),
                              # with each hop's bandwidth where a link test measured it (coordinator/hop_bandwidth.py)
                              "links": [{"peer": _text(link.get("peer")), "kind": _text(link.get("kind")),
                                         "bandwidth_gbps": _number(link.get("bandwidth_gbps"))}
                                        for link in (p.get("links") or [])[:8] if isinstance(link, dict)],
                              "rtt_ms": None if p.get("rtt_ms") is None else _number(p.get("rtt_ms"), 0),
                              "profile": device_summary(p.get("profile")), "stages": stages_of.get(p["peer"], []),
                              "reputation": standing.get("reputation"), "stake_units": standing.get("stake_units"),
                              # contradicted claims the ledger recorded (coordinator/misconduct.py)
                              "misconduct_count": standing.get("misconduct_count"),
                              "earned_units": standing.get("earned_units"),
                              "balance_units": standing.get("balance_units"),
                              "slashed_units": standing.get("slashed_units"),
                              "benched": None if bench is None else {"back_in_s": bench["back_in_s"],
                                                                     "reason": _text(bench["reason"])},
                              "measured": _measured(p.get("measured"))})

        ttft = self.metrics.recent_ttft_ms()
        out = {
            "ts_ms": int(time.time() * 1000), "model": {"id": self.model_id, "n_layers": n_layers},
            "pool": {"tokens_per_s": round(sum(p["tokens_per_s"] for p in pipelines), 2),
                     "requests_in_flight": self.metrics.in_flight_now(),
                     "pending_requests": snapshot.get("pending_requests", 0),
                     "ttft_ms_last": round(ttft[-1], 1) if ttft else None,
                     "ttft_ms_median": round(statistics.median(ttft), 1) if ttft else None,
                     "tokens_total": self.metrics.tokens_total(), "plan_error": _text(snapshot.get("plan_error", "")),
                     "providers_by_state": _count_states(providers)},
            "providers": providers, "pipelines": pipelines, "audits": [], "slashes": [], "ledger": None,
            # what the coordinator's own timing contradicted (coordinator/measurements.py)
            "misconduct": [{"peer": _text(e.get("peer")), "kind": _text(e.get("kind")), "detail": _text(e.get("detail"))}
                           for e in snapshot.get("measurements", {}).get("events", [])][-10:],
        }
        if ledger is not None:
            supply = ledger["supply"]
            out["audits"], out["slashes"] = ledger["audits"], ledger["slashes"]
            out["ledger"] = {"head_hash": supply["head_hash"], "entry_count": supply["entry_count"],
                             "tree_root": supply["tree_root"], "supply_units": supply["supply_units"],
                             "escrow_requests_units": supply["escrow_requests_units"],
                             "escrow_stakes_units": supply["escrow_stakes_units"], "open_holds": supply["open_holds"],
                             "last_checkpoint": ledger["last_checkpoint"],
                             "audits_by_verdict": ledger["audits_by_verdict"], "slash_count": ledger["slash_count"],
                             "slashed_units": ledger["slashed_units"]}
        return out


def _measured(measured) -> dict | None:
    """What the coordinator measured of a provider and plans it with (its profile is only a claim)."""
    if not isinstance(measured, dict):
        return None
    return {"source": _text(measured.get("source")), "contradicted": bool(measured.get("contradicted")),
            "bandwidth_gb_per_s": _number(measured.get("mem_bandwidth_gb_per_s")),
            "matmul_tflops": _number(measured.get("matmul_tflops"))}


def _count_states(providers: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in providers:
        counts[p["state"]] = counts.get(p["state"], 0) + 1
    return counts
