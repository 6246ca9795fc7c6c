"""Seeded chaos against a real pool, checked afterwards by a model of what consumers paid.

    python bench/chaos.py --seed N --minutes M [--coordinator-faults] [--drop P --dup P --delay P --delay-ms MS]

One seed decides everything the run does to the pool (TigerBeetle's simulator replays a run from
its seed; here the processes are real, so the seed replays the faults, not the thread timing):
  * a schedule of process faults, one at a time: `kill -9` of a provider (started again with the
    same command and data directory a few seconds later) or SIGSTOP of it (SIGCONT a few seconds
    later); with `--coordinator-faults`, the coordinator too, started again with the same command,
    data directory and ports;
  * frame faults in every process's transport (node/transport/faults.py, through MESHPOOL_FAULTS),
    each process with its own seed derived from the run's: frames dropped, delayed, duplicated;
  * the consumers' requests: prompts and lengths drawn from the seed, greedy, through the `openai`
    client, some streamed.
The pool is started as a user starts one (`coordinator serve`, `provider join`, `coordinator
vouch`, `coordinator consumer add`: coordinator/local_pool.py). After the run every fault is healed,
every hold resolved, and a model of the consumers (Jepsen's bank test) is checked against the
ledger's database as an auditor reads it:
  * conservation: for every consumer, balance + held + spent = minted, nothing held at the end,
    and the ledger's supply equals the sum of its balances;
  * `ledger verify` replays the log from genesis and passes;
  * no provider is slashed (every provider here is honest);
  * every request either answered the reference text (greedy `transformers` in one process) and
    paid no more than the tokens it got, or failed and paid nothing (its hold refunded exactly), or
    (a stream cut by a coordinator crash) paid for text that is the start of the reference.
It prints the seed, the schedule, minutes, faults injected, requests and violations, and writes
bench/chaos.json. tests/chaos/ runs short seeds of it in CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.local_pool import LocalPool, Process  # noqa: E402
from node.transport.faults import ENV_VAR as FAULTS_ENV_VAR, FaultSpec  # noqa: E402

# The switch the CI seeds run with. Coordinator kill/stop faults break the pool on main today
# (providers never re-dial a restarted coordinator; holds in flight are voided on restart): flip this
# to True once providers re-dial (branch wip-redial) and in-flight holds survive a crash (wip-durable).
COORDINATOR_FAULTS_IN_CI = False

MODEL = "smollm2-135m-instruct"
N_LAYERS = 30
PROVIDERS = 3
PROVIDER_CAP_MB = 480  # half the default model: two providers make a pipeline, the third is the spare
CONSUMERS = 2
CLIENT_THREADS = 3
CREDITS_UNITS = 10**10
PROMPTS = ("Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):",
           "The capital of France is", "Water boils at")
MAX_TOKENS = (6, 12, 20)
HEARTBEAT_TIMEOUT_S = 3.0
STEP_TIMEOUT_S = 10.0  # a dropped step frame stalls its pipeline this long, then its requests are replayed
REQUEST_TIMEOUT_S = 180.0
SETTLE_WAIT_S = 90.0  # after the run, for every hold to be resolved
# frame faults of a run unless told otherwise: rare drops (each stalls a pipeline up to STEP_TIMEOUT_S
# or a control request up to its timeout), more duplicates and delays (cheap if handled right)
DEFAULT_DROP, DEFAULT_DUP, DEFAULT_DELAY, DEFAULT_DELAY_MS = 0.002, 0.01, 0.02, 150.0


# -- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessFault:
    at_s: float  # after the run's start
    kind: str  # "kill" (kill -9, then started again) or "stop" (SIGSTOP, then SIGCONT)
    target: str  # "coordinator" or a provider's name
    for_s: float  # until it is started again / continued

    def __str__(self) -> str:
        verb = "kill -9, restart" if self.kind == "kill" else "SIGSTOP, SIGCONT"
        return f"t={self.at_s:6.1f}s  {self.target:<12} {verb} after {self.for_s:.1f}s"


@dataclass(frozen=True)
class ClientRequest:
    prompt: str
    max_tokens: int
    stream: bool


@dataclass(frozen=True)
class Schedule:
    seed: int
    minutes: float
    faults: tuple[ProcessFault, ...]
    frame_faults: dict  # process name -> MESHPOOL_FAULTS value
    requests: tuple[tuple[ClientRequest, ...], ...]  # per client thread, taken in turn until the run ends

    def describe(self) -> str:
        lines = [f"seed {self.seed}, {self.minutes:g} min, {len(self.faults)} process faults:"]
        lines += [f"  {f}" for f in self.faults]
        lines += [f"  frames in {name}: {FAULTS_ENV_VAR}={spec}" for name, spec in sorted(self.frame_faults.items())]
        return "\n".join(lines)


def provider_names(n: int = PROVIDERS) -> list[str]:
    return [f"provider{i}" for i in range(n)]


def derive_seed(seed: int, *names: str) -> int:
    """A sub-seed for one use of the run's seed (stable across Python versions and runs)."""
    digest = hashlib.sha256("/".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_schedule(seed: int, minutes: float, coordinator_faults: bool = False, drop: float = DEFAULT_DROP,
                  dup: float = DEFAULT_DUP, delay: float = DEFAULT_DELAY, delay_ms: float = DEFAULT_DELAY_MS,
                  providers: int = PROVIDERS) -> Schedule:
    """Everything a run does, from its seed alone. One process fault at a time, with a quiet gap after
    each, so the pool (one pipeline and a spare) always has the providers to re-plan onto."""
    rng = random.Random(derive_seed(seed, "processes"))
    names = provider_names(providers)
    faults, t = [], rng.uniform(2.0, 5.0)
    while t < minutes * 60:
        target = "coordinator" if coordinator_faults and rng.random() < 0.25 else rng.choice(names)
        kind = rng.choice(("kill", "stop"))
        for_s = round(rng.uniform(1.0, 6.0), 1)
        faults.append(ProcessFault(round(t, 1), kind, target, for_s))
        t += for_s + rng.uniform(4.0, 10.0)
    frame_faults = {name: FaultSpec(derive_seed(seed, "frames", name), drop, dup, delay, delay_ms).format()
                    for name in ["coordinator", *names]} if (drop or dup or delay) else {}
    clients, requests_per_client = [], int(minutes * 60 * 4) + 50  # more than a client can send in the run
    for c in range(CLIENT_THREADS):
        crng = random.Random(derive_seed(seed, "client", str(c)))
        clients.append(tuple(ClientRequest(crng.choice(PROMPTS), crng.choice(MAX_TOKENS), crng.random() < 0.5)
                             for _ in range(requests_per_client)))
    return Schedule(seed, minutes, tuple(faults), frame_faults, tuple(clients))


# -- the pool -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChaosPool(LocalPool):
    """A LocalPool whose processes get their frame faults, and whose processes can be killed, stopped
    and started again by name with the same command (the coordinator on the same ports)."""

    def __init__(self, root: Path, frame_faults: dict):
        super().__init__(root, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, coordinator_args=[
            "--p2p-port", str(free_port()), "--api-port", str(free_port()), "--rate-limit-rps", "0",
            "--step-timeout-s", str(STEP_TIMEOUT_S)])
        self.frame_faults = frame_faults
        self.by_name: dict[str, Process] = {}
        self.ready_prefix: dict[str, str] = {}

    def process_env(self, name: str) -> dict[str, str]:
        spec = self.frame_faults.get(name)
        return {FAULTS_ENV_VAR: spec} if spec else {}

    def _spawn(self, name: str, args: list[str], ready_prefix: str) -> Process:
        proc = super()._spawn(name, args, ready_prefix)
        self.by_name[name], self.ready_prefix[name] = proc, ready_prefix
        return proc

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.by_name[name].popen.pid, sig)

    def kill9(self, name: str) -> None:
        proc = self.by_name[name]
        proc.popen.kill()
        proc.popen.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Start `name` again with the command it was started with (its data directory, its ports)."""
        old = self.by_name[name]
        proc = self._spawn(name, list(old.popen.args), self.ready_prefix[name])
        if name == "coordinator":
            self.coordinator = proc
        else:
            peer = proc.ready_line.split("peer=", 1)[1]
            self.providers[peer] = proc

    def alive(self, name: str) -> bool:
        return self.by_name[name].popen.poll() is None

    def peers(self) -> dict[str, str]:
        """Provider name -> peer id (ids stay with the data directories across restarts)."""
        return {proc.name: peer for peer, proc in self.providers.items()}


# -- the consumers --------------------------------------------------------------------------


@dataclass
class Outcome:
    consumer: str
    request: ClientRequest
    ok: bool
    id: str = ""
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def run_client(base_url: str, consumer: str, key: str, requests: tuple[ClientRequest, ...],
               stop: threading.Event, out: list, lock: threading.Lock) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    for request in requests:
        if stop.is_set():
            return
        outcome = Outcome(consumer, request, ok=False)
        parts: list[str] = []  # a stream's text deltas so far: what the consumer got if it breaks
        try:
            if request.stream:
                chunks = client.completions.create(model=MODEL, prompt=request.prompt, max_tokens=request.max_tokens,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
                for chunk in chunks:
                    outcome.id = chunk.id or outcome.id
                    parts += [c.text for c in chunk.choices]
                    if chunk.usage is not None:
                        outcome.prompt_tokens, outcome.completion_tokens = (chunk.usage.prompt_tokens,
                                                                            chunk.usage.completion_tokens)
                outcome.text = "".join(parts)
                outcome.ok = outcome.completion_tokens > 0
                if not outcome.ok:
                    outcome.error = "stream ended without usage"
            else:
                done = client.completions.create(model=MODEL, prompt=request.prompt, max_tokens=request.max_tokens,
                                                 temperature=0)
                outcome.id, outcome.text = done.id, done.choices[0].text
                outcome.prompt_tokens, outcome.completion_tokens = done.usage.prompt_tokens, done.usage.completion_tokens
                outcome.ok = True
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome the model checks
            outcome.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            outcome.text = "".join(parts)
            time.sleep(0.5)  # a pool that is down answers at once: don't spin
        with lock:
            out.append(outcome)


# -- the reference --------------------------------------------------------------------------


class Reference:
    """Greedy text of `transformers` in one process: what every answered request must equal."""

    def __init__(self, model=None, tokenizer=None, model_dir: Path | None = None):
        if model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from node.models import default_model_dir

            model_dir = model_dir or default_model_dir()
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model, self.tokenizer = model, tokenizer
        self._ids: dict[str, list[int]] = {}  # prompt -> its greedy continuation, max(MAX_TOKENS) long

    def __call__(self, prompt: str, max_tokens: int) -> str:
        import torch

        # greedy: the first n tokens of a longer generation are the generation of n tokens
        if prompt not in self._ids or len(self._ids[prompt]) < max_tokens:
            ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
            # one thread: beside a pool's processes on a small machine more threads only spin (4-5x slower)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.no_grad():
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=max(max_tokens, *MAX_TOKENS), do_sample=False)
            finally:
                torch.set_num_threads(threads)
            self._ids[prompt] = out[0, ids.shape[1]:].tolist()
        return self.tokenizer.decode(self._ids[prompt][:max_tokens], skip_special_tokens=True)


# -- one run --------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    minutes: float
    coordinator_faults: bool
    process_faults: dict = field(default_factory=dict)  # kind -> count applied
    frame_faults: dict = field(default_factory=dict)  # dropped / delayed / duplicated -> count
    requests: int = 0
    answered: int = 0
    failed: int = 0
    errors: dict = field(default_factory=dict)  # what failed requests ended with (error class, status) -> count
    violations: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"seed {self.seed}  minutes {self.minutes:g}  coordinator faults {'on' if self.coordinator_faults else 'off'}"
                f"  process faults {sum(self.process_faults.values())} {self.process_faults}"
                f"  frame faults {sum(self.frame_faults.values())} {self.frame_faults}"
                f"  requests {self.requests} (answered {self.answered}, failed {self.failed} {self.errors})"
                f"  violations {len(self.violations)}")


def run(seeds: Sequence[int], minutes: float, root: Path, reference: Reference, coordinator_faults: bool = False,
        log=print, **rates) -> list[Report]:
    """One pool; each seed in turn runs its schedule on it, then every invariant is checked (the pool
    quiet, every hold resolved). The pool's frame faults come from the first seed (a process keeps
    its MESHPOOL_FAULTS for life); a single seed is a whole run."""
    schedules = [make_schedule(seed, minutes, coordinator_faults, **rates) for seed in seeds]
    pool = ChaosPool(Path(root), schedules[0].frame_faults)
    outcomes: list[Outcome] = []
    keys: dict[str, str] = {}
    reports: list[Report] = []
    phase = _Phases(log)
    try:
        pool.start_coordinator()
        # the consumers are added (`coordinator consumer add`, a process each) while the providers start
        adders = [threading.Thread(target=lambda n=f"c{i}": keys.update({n: pool.add_consumer(n, CREDITS_UNITS)}))
                  for i in range(CONSUMERS)]
        for adder in adders:
            adder.start()
        for name in provider_names():
            pool.add_provider(name, PROVIDER_CAP_MB)
        pool.wait_for_pipelines(1, timeout_s=180)
        for adder in adders:
            adder.join(timeout=120)
        accounts = {name: _account_id(pool, key) for name, key in keys.items()}
        phase("pool started")
        for schedule in schedules:
            log(schedule.describe())
            report, seen = Report(schedule.seed, minutes, coordinator_faults), len(outcomes)
            frames_before = _count_frame_faults(pool.root)
            lock, stop = threading.Lock(), threading.Event()
            clients = [threading.Thread(target=run_client, args=(
                pool.api + "/v1", f"c{i % CONSUMERS}", keys[f"c{i % CONSUMERS}"], requests, stop, outcomes, lock),
                daemon=True) for i, requests in enumerate(schedule.requests)]
            for client in clients:
                client.start()
            try:
                _apply(schedule, pool, report, log)
                phase(f"seed {schedule.seed}: faults done")
            finally:
                stop.set()
                _heal(pool)
            for client in clients:
                client.join(timeout=REQUEST_TIMEOUT_S + 30)
            _wait_settled(pool)
            phase(f"seed {schedule.seed}: clients done, holds resolved")
            report.frame_faults = {k: v - frames_before.get(k, 0) for k, v in _count_frame_faults(pool.root).items()}
            mine = outcomes[seen:]
            report.requests, report.answered = len(mine), sum(o.ok for o in mine)
            report.failed = report.requests - report.answered
            for o in [o for o in mine if not o.ok][:10]:
                log(f"failed request: {o.request} -> {o.error}")
            for o in mine:
                if not o.ok:
                    kind = o.error.split(" - ")[0].split(".")[0][:80]  # "InternalServerError: Error code: 503"
                    report.errors[kind] = report.errors.get(kind, 0) + 1
            report.violations = check(pool, outcomes, accounts, reference, mine)
            phase(f"seed {schedule.seed}: checked")
            for v in report.violations[:30]:
                log(f"VIOLATION {v}")
            log(report.summary())
            reports.append(report)
    finally:
        _heal(pool)
        pool.stop()
    return reports


class _Phases:
    """Logs how long each phase of a run took (the machine is shared: where did the time go?)."""

    def __init__(self, log):
        self.log, self.last_s = log, time.monotonic()

    def __call__(self, what: str) -> None:
        now_s = time.monotonic()
        self.log(f"-- {what} ({now_s - self.last_s:.1f} s)")
        self.last_s = now_s


def _apply(schedule: Schedule, pool: ChaosPool, report: Report, log) -> None:
    """Apply the process faults at their times, one at a time; return when the run's minutes are up."""
    t0 = time.monotonic()
    for fault in schedule.faults:
        time.sleep(max(0.0, fault.at_s - (time.monotonic() - t0)))
        log(f"[{time.monotonic() - t0:6.1f}s] {fault}")
        if not pool.alive(fault.target):  # a process that died by itself (it should not): say so, restart it
            report.violations.append(f"{fault.target} exited by itself before t={fault.at_s}s")
            pool.restart(fault.target)
            continue
        if fault.kind == "kill":
            pool.kill9(fault.target)
            time.sleep(fault.for_s)
            pool.restart(fault.target)
        else:
            pool.signal(fault.target, signal.SIGSTOP)
            time.sleep(fault.for_s)
            pool.signal(fault.target, signal.SIGCONT)
        key = f"{fault.kind} {'coordinator' if fault.target == 'coordinator' else 'provider'}"
        report.process_faults[key] = report.process_faults.get(key, 0) + 1
    time.sleep(max(0.0, schedule.minutes * 60 - (time.monotonic() - t0)))


def _heal(pool: ChaosPool) -> None:
    for name in list(pool.by_name):
        try:
            if pool.alive(name):
                pool.signal(name, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _wait_settled(pool: ChaosPool) -> None:
    """Until the ledger holds no open hold (settlements finish after the answers), or SETTLE_WAIT_S."""
    deadline = time.monotonic() + SETTLE_WAIT_S
    while time.monotonic() < deadline:
        try:
            if pool.get("/ledger/supply")["open_holds"] == 0:
                return
        except OSError:
            pass
        time.sleep(0.5)


def _count_frame_faults(root: Path) -> dict:
    counts = {"dropped": 0, "delayed": 0, "duplicated": 0}
    for log_path in root.glob("*.log"):
        for line in log_path.read_text(errors="replace").splitlines():
            if "frame fault: " in line:
                what = line.split("frame fault: ", 1)[1].split(" ", 1)[0]
                counts[what] = counts.get(what, 0) + 1
    return counts


# -- the consumer model ---------------------------------------------------------------------


def _account_id(pool: ChaosPool, key: str) -> str:
    """The consumer's ledger account, as `/v1/account` names it to the key's holder."""
    request = urllib.request.Request(pool.api + "/v1/account", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["account_id"]


def check(pool: ChaosPool, outcomes: list[Outcome], accounts: dict, reference: Reference,
          latest: list[Outcome]) -> list[str]:
    """Every invariant the run must keep, checked against the ledger's database as an auditor reads
    it (the pool quiet): money over all `outcomes` so far, each request of the `latest` seed; the
    violations found (empty: none)."""
    from contracts import DEFAULT_PARAMS
    from contracts.pricing import quote
    from ledger.reader import LedgerReader
    from ledger.state import OPEN

    violations: list[str] = []
    data_dir = pool.root / "coordinator"
    verify = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=600)
    if verify.returncode != 0:
        violations.append(f"ledger verify failed: {(verify.stdout + verify.stderr).strip()[-500:]}")
    reader = LedgerReader.open(data_dir=data_dir)
    try:
        supply = reader.supply()
        if supply["sum_of_balances_units"] != supply["supply_units"]:
            violations.append(f"supply {supply['supply_units']} != sum of balances {supply['sum_of_balances_units']}")
        if supply["open_holds"]:
            violations.append(f"{supply['open_holds']} holds still open {SETTLE_WAIT_S:.0f} s after the run")
        for name, account_id in accounts.items():  # consumer name -> its ledger account
            money = reader.spending(account_id)
            total = money["balance_units"] + money["held_units"] + money["paid_units"]
            if total != CREDITS_UNITS:
                violations.append(f"consumer {name}: balance {money['balance_units']} + held {money['held_units']} + "
                                  f"spent {money['paid_units']} = {total}, minted {CREDITS_UNITS}")
            # what the requests the consumer knows of (by id) paid is all it paid: one that failed before
            # it was given an id paid nothing
            known = [o for o in outcomes if o.consumer == name and o.id]
            paid_known = sum(int((reader.hold(f"hold:{o.id}") or {}).get("paid_units", 0)) for o in known)
            if paid_known != money["paid_units"]:
                violations.append(f"consumer {name}: spent {money['paid_units']}, but its requests paid {paid_known}: "
                                  f"requests that failed unseen were charged {money['paid_units'] - paid_known}")
        for o in latest:
            hold = reader.hold(f"hold:{o.id}") if o.id else None
            if o.ok:
                expected = reference(o.request.prompt, o.request.max_tokens)
                if o.text != expected:
                    violations.append(f"request {o.id} ({o.request}): answered {o.text!r}, reference {expected!r}")
                processed = o.prompt_tokens + o.completion_tokens - 1
                most = quote(processed, 0, N_LAYERS, DEFAULT_PARAMS).total_units if processed > 0 else 0
                if hold is not None and hold["paid_units"] > most:
                    violations.append(f"request {o.id}: paid {hold['paid_units']} for {processed} tokens processed, "
                                      f"at most {most}")
            elif hold is not None and hold["status"] == OPEN:
                violations.append(f"failed request {o.id} ({o.error}): its hold is still open")
            elif hold is not None and hold["paid_units"]:
                # a stream cut mid-way (the coordinator died) pays for the tokens it delivered, which must
                # be the reference's; one that delivered nothing is refunded exactly
                expected = reference(o.request.prompt, o.request.max_tokens)
                if not o.text or not expected.startswith(o.text):
                    violations.append(f"failed request {o.id} ({o.error}) paid {hold['paid_units']} for delivering "
                                      f"{o.text!r}, not a start of the reference {expected!r}")
        for name, peer in sorted(pool.peers().items()):
            try:
                slashed = reader.account(peer, 0).get("slashed_units", 0)
            except Exception:  # noqa: BLE001 - a provider with no account was never paid or slashed
                continue
            if slashed:
                violations.append(f"honest provider {name} ({peer}) slashed {slashed} units")
    finally:
        reader.engine.dispose()
    if not any(o.ok for o in latest):
        violations.append("no request was answered: the pool never served")
    return violations


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--coordinator-faults", action="store_true",
                   help="also kill -9 and SIGSTOP the coordinator (needs providers that re-dial it)")
    p.add_argument("--drop", type=float, default=DEFAULT_DROP)
    p.add_argument("--dup", type=float, default=DEFAULT_DUP)
    p.add_argument("--delay", type=float, default=DEFAULT_DELAY)
    p.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS)
    p.add_argument("--dir", type=Path, help="where the pool's data and logs go (default: a new temp dir)")
    p.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    import tempfile

    root = args.dir or Path(tempfile.mkdtemp(prefix=f"chaos-{args.seed}-"))
    print(f"pool data and logs in {root}")
    [report] = run([args.seed], args.minutes, root, Reference(), args.coordinator_faults, drop=args.drop,
                   dup=args.dup, delay=args.delay, delay_ms=args.delay_ms)
    print("| seed | minutes | coordinator faults | process faults | frame faults | requests | answered | violations |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {report.seed} | {report.minutes:g} | {'on' if report.coordinator_faults else 'off'} | "
          f"{sum(report.process_faults.values())} | {sum(report.frame_faults.values())} | {report.requests} | "
          f"{report.answered} | {len(report.violations)} |")
    args.json.write_text(json.dumps({**asdict(report), "note": "measured on a shared 2-core machine"}, indent=2) + "\n")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
