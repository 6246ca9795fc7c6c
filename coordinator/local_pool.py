"""A pool on this machine, started the way a user starts one: `coordinator serve` and several
`provider join` processes, each in its own data directory. The demo and the tests share it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, for a process that must listen on the same one after a restart."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_line: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _in_netns(netns: str) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


class LocalPool:
    def __init__(self, root: Path, model_dir: Path | None = None, heartbeat_timeout_s: float = 3.0,
                 context_tokens: int = 512, max_sessions: int = 8, coordinator_args: list[str] = (),
                 compute_threads: int = 1, code_dir: Path | None = None):
        """`code_dir`: a checkout whose code the processes run (default: this one), e.g. to measure
        another branch against this one in the same run."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_dir = model_dir
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.context_tokens, self.max_sessions = context_tokens, max_sessions
        self.coordinator_args = list(coordinator_args)
        self.compute_threads = compute_threads
        self.code_dir = code_dir
        self.coordinator: Process | None = None
        self.providers: dict[str, Process] = {}  # peer id -> process
        self.p2p_addr = self.api = ""

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], ready_prefix: str) -> Process:
        log_path = self.root / f"{name}.log"
        log = open(log_path, "a")  # a process started again (same name) adds to its log
        popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
            # Many processes share this machine's cores: one compute thread each by default, or
            # OpenMP's spinning threads starve the others (and their libp2p event loops) of CPU.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.compute_threads),
                 **({"PYTHONPATH": os.pathsep.join([str(self.code_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}
                    if self.code_dir else {}), **self.process_env(name)},
            cwd=self.code_dir, start_new_session=True,
        )
        proc = Process(name, popen, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = popen.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited before it was ready:\n{proc.log()[-3000:]}")
            if line.startswith(ready_prefix):
                proc.ready_line = line.strip()
                return proc
        raise TimeoutError(f"{name} not ready after {READY_TIMEOUT_S} s:\n{proc.log()[-3000:]}")

    def process_env(self, name: str) -> dict[str, str]:
        """Environment variables the process called `name` gets besides this one's (none here)."""
        return {}

    def start_coordinator(self, netns: str = "") -> None:
        """`netns`: run it in that network namespace (scripts/netns.sh), as `ip netns exec` does."""
        args = [*_in_netns(netns), sys.executable, "-m", "coordinator.cli", "serve", "--data-dir",
                str(self.root / "coordinator"),
                "--heartbeat-timeout-s", str(self.heartbeat_timeout_s), "--context-tokens", str(self.context_tokens),
                "--max-sessions", str(self.max_sessions), *self.coordinator_args]
        if self.model_dir:
            args += ["--model", str(self.model_dir)]
        self.coordinator = self._spawn("coordinator", args, "coordinator ready")
        fields = dict(part.split("=", 1) for part in self.coordinator.ready_line.split()[2:])
        self.p2p_addr, self.api = fields["p2p"], fields["api"]

    def add_provider(self, name: str, max_memory_mb: int | None = None, vouch: bool = True,
                     extra_args: list[str] = (), netns: str = "") -> str:
        args = [*_in_netns(netns), sys.executable, "-m", "node.cli", "join", self.p2p_addr, "--data-dir", str(self.root / name),
                "--device", "cpu", "--quick-profile", *extra_args]
        if max_memory_mb:
            args += ["--max-memory-mb", str(max_memory_mb)]
        if self.model_dir:
            args += ["--model", str(self.model_dir)]
        proc = self._spawn(name, args, "provider ready")
        peer = proc.ready_line.split("peer=", 1)[1]
        self.providers[peer] = proc
        if vouch:
            self.vouch(peer)
        return peer

    def vouch(self, peer: str) -> None:
        subprocess.run([sys.executable, "-m", "coordinator.cli", "vouch", peer, "--data-dir",
                        str(self.root / "coordinator")], check=True, capture_output=True, timeout=60)

    def add_consumer(self, name: str, credits_units: int, db: str | None = None) -> str:
        """`coordinator consumer add` (with `--db` if given): a consumer account with credits; returns its API key."""
        done = subprocess.run([sys.executable, "-m", "coordinator.cli", "consumer", "add", name, "--credits",
                               str(credits_units), "--data-dir", str(self.root / "coordinator"),
                               *(["--db", db] if db else [])],
                              check=True, capture_output=True, text=True, timeout=60)
        return done.stdout.strip().splitlines()[-1]

    def kill(self, peer: str) -> None:
        """kill -9: no goodbye, no drain."""
        proc = self.providers.pop(peer)
        proc.popen.kill()
        proc.popen.wait(timeout=30)

    def kill_coordinator(self) -> None:
        """kill -9 of the coordinator; the providers stay up. `start_coordinator` starts it again on the
        same data directory (give it a fixed `--p2p-port` in `coordinator_args`: providers dial that)."""
        self.coordinator.popen.kill()
        self.coordinator.popen.wait(timeout=30)

    def leave(self, peer: str, timeout_s: float = 90.0) -> int:
        """SIGTERM, as Ctrl-C would: the provider drains and announces its leave."""
        proc = self.providers.pop(peer)
        proc.popen.send_signal(signal.SIGTERM)
        return proc.popen.wait(timeout=timeout_s)

    def stop(self) -> None:
        for proc in list(self.providers.values()) + ([self.coordinator] if self.coordinator else []):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in list(self.providers.values()) + ([self.coordinator] if self.coordinator else []):
            try:
                proc.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
        self.providers.clear()

    # -- HTTP -----------------------------------------------------------------------------

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.api + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout_s: float = 300.0, api_key: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(self.api + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait_for(self, predicate, timeout_s: float = 120.0, what: str = "the pool"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.get("/pool")
            if predicate(state):
                return state
            time.sleep(0.2)
        raise TimeoutError(f"{what} not reached in {timeout_s} s; {self.describe(state)}")

    def describe(self, state: dict) -> str:
        """What a failed wait needs to be read: the plan, each provider's state, and the warnings and
        errors each process logged last (the first 2,000 characters of /pool hid all three)."""
        pipelines = [[(s["peer"][-6:], s["start"], s["end"]) for s in p["stages"]] for p in state.get("pipelines", [])]
        providers = [(p["peer"][-6:], p["state"]) for p in state.get("providers", [])]
        benched = [(b["peer"][-6:], b["reason"][:120]) for b in state.get("benched", []) if b["benched"]]
        lines = [f"pipelines {pipelines}", f"providers {providers}", f"benched {benched}",
                 f"plan_error {state.get('plan_error')!r}"]
        for proc in [self.coordinator, *self.providers.values()]:
            if proc is None:
                continue
            trouble = [line for line in proc.log().splitlines()
                       if any(word in line for word in ("WARNING", "ERROR", "Traceback", "Error"))]
            exit_code = proc.popen.poll()
            lines.append(f"-- {proc.name}" + (f" (exited {exit_code})" if exit_code is not None else "")
                         + "".join(f"\n   {line[:300]}" for line in trouble[-8:]))
        return "\n".join(lines)

    def wait_for_pipelines(self, n: int = 1, timeout_s: float = 120.0) -> dict:
        return self.wait_for(lambda s: len(s["pipelines"]) >= n, timeout_s, f"{n} pipelines")
