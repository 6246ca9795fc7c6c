"""Recovery of a local pool: a stage killed mid-generation, and the coordinator killed and restarted.

    python bench/recovery.py [--kills 2] [--restarts 1] [--baseline-ref f89d4da] [--deadline-s 40]

Each figure is measured twice in one run, on the same machine and the same scenario: on this
checkout ("after") and on `--baseline-ref` ("before": by default the last commit before failover
on the connection and re-dialing providers), extracted with `git archive` into a temporary
directory and run from there.

- Stage-kill failover gap: 4 `provider join` processes capped at 300 MiB (a 3-stage pipeline and a
  spare); one client streams a greedy completion over SSE; after 16 tokens a middle or last stage
  gets `kill -9`. The gap is the time from the kill to the next token at the client (the request
  then completes on the new pipeline; its text is checked against the one before the kill). A spare
  joins again before the next kill.
- Restart-to-serving: `kill -9` of `coordinator serve`, then the same command on the same data
  directory and p2p port while the providers stay up. Figures: from the new coordinator's ready line
  to the first completion answered 200 (a 1-token request every 0.2 s), and from the kill. "before"
  stops at `--deadline-s` (providers there never dial the coordinator again).

Writes bench/recovery.json. Measured on a small shared machine: the absolute figures move with the
load of other processes; the ratio is within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from coordinator.local_pool import LocalPool, free_port  # noqa: E402

CAP_MB = 300  # no provider holds the model: 3 stages (tests/coordinator/conftest.py)
MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village,"
KILL_AFTER_TOKENS = 16
MAX_TOKENS = 160


def extract(ref: str, into: Path) -> Path:
    """The tree of `ref` as files, without touching any checkout."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def stages(pool: LocalPool) -> list[str]:
    state = pool.get("/pool")
    return [s["peer"] for s in state["pipelines"][0]["stages"]] if state["pipelines"] else []


def settled(pool: LocalPool, n: int = 3, timeout_s: float = 180) -> list[str]:
    def ok(state):
        if not state["pipelines"] or len(state["pipelines"][0]["stages"]) != n:
            return False
        time.sleep(1.0)
        return stages(pool) == [s["peer"] for s in state["pipelines"][0]["stages"]]

    pool.wait_for(ok, timeout_s, "a settled 3-stage pipeline")
    return stages(pool)


def stream_tokens(pool: LocalPool, key: str, on_token) -> str:
    """One greedy streamed completion; on_token(i) at each text chunk; the whole text."""
    text = []
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", pool.api + "/v1/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if piece:
                text.append(piece)
                on_token(len(text))
    return "".join(text)


def failover_gap_s(pool: LocalPool, key: str, position: int, reference: str) -> float:
    victim = settled(pool)[position]
    times: list[float] = []
    killed = threading.Event()
    kill_s = [0.0]

    def on_token(i: int):
        times.append(time.perf_counter())
        if i == KILL_AFTER_TOKENS:
            killed.set()

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(text=stream_tokens(pool, key, on_token)))
    worker.start()
    if not killed.wait(120):
        raise RuntimeError("the stream did not reach the kill point")
    kill_s[0] = time.perf_counter()
    pool.kill(victim)
    worker.join(300)
    if result.get("text") != reference:
        raise RuntimeError(f"text after the failover differs: {result.get('text')!r}")
    return min(t for t in times if t > kill_s[0]) - kill_s[0]


def restart_s(pool: LocalPool, key: str, deadline_s: float) -> tuple[float | None, float | None]:
    """(ready line -> first 200, kill -> first 200); None past the deadline."""
    kill_s = time.perf_counter()
    pool.kill_coordinator()
    pool.start_coordinator()
    ready_s = time.perf_counter()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    while time.perf_counter() - ready_s < deadline_s:
        try:
            status, _ = pool.post("/v1/completions", body, timeout_s=5, api_key=key)
        except OSError:  # refused while it starts, or waiting for a pipeline past the client's patience
            status = 0
        if status == 200:
            now = time.perf_counter()
            return now - ready_s, now - kill_s
        time.sleep(0.2)
    return None, None


def run_variant(name: str, code: Path, kills: int, restarts: int, deadline_s: float) -> dict:
    os.chdir(code)  # `python -m coordinator.cli` resolves from the working directory first
    os.environ["PYTHONPATH"] = str(code)
    root = Path(tempfile.mkdtemp(prefix=f"recovery-{name}-"))
    pool = LocalPool(root, heartbeat_timeout_s=3.0, coordinator_args=["--p2p-port", str(free_port())])
    out: dict = {"gaps_s": [], "restart_to_serving_s": [], "kill_to_serving_s": [], "root": str(root)}
    try:
        pool.start_coordinator()
        for i in range(4):
            pool.add_provider(f"p{i}", max_memory_mb=CAP_MB)
        key = pool.add_consumer("bench", 10**12)
        settled(pool)
        reference = stream_tokens(pool, key, lambda i: None)
        for k in range(kills):
            gap = failover_gap_s(pool, key, 1 + k % 2, reference)  # a middle stage, then the last
            out["gaps_s"].append(round(gap, 3))
            print(f"{name}: kill -9 of stage {1 + k % 2}: next token after {gap:.2f} s", flush=True)
            pool.add_provider(f"spare{k}", max_memory_mb=CAP_MB)
        for _ in range(restarts):
            settled(pool)
            from_ready, from_kill = restart_s(pool, key, deadline_s)
            out["restart_to_serving_s"].append(None if from_ready is None else round(from_ready, 2))
            out["kill_to_serving_s"].append(None if from_kill is None else round(from_kill, 2))
            print(f"{name}: coordinator restart: serving "
                  + (f"{from_ready:.2f} s after its ready line ({from_kill:.2f} s after the kill)" if from_ready
                     else f"not within {deadline_s:.0f} s"), flush=True)
    finally:
        pool.stop()
        os.chdir(REPO)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--baseline-ref", default="f89d4da",
                        help="the code measured as 'before' (default: the last commit before this recovery work)")
    parser.add_argument("--deadline-s", type=float, default=40.0, help="how long 'before' may take to serve again")
    parser.add_argument("--skip-before", action="store_true", help="measure this checkout only (no ratio)")
    args = parser.parse_args()
    before: dict = {"gaps_s": [], "restart_to_serving_s": [], "kill_to_serving_s": []}
    if not args.skip_before:
        with tempfile.TemporaryDirectory(prefix="recovery-baseline-") as tmp:
            before = run_variant("before", extract(args.baseline_ref, Path(tmp)), args.kills, args.restarts,
                                 args.deadline_s)
    after = run_variant("after", REPO, args.kills, args.restarts, args.deadline_s)

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    rows = {
        "stage kill -> next token (s)": (median(before["gaps_s"]), median(after["gaps_s"])),
        "coordinator ready -> serving (s)": (median(before["restart_to_serving_s"]),
                                             median(after["restart_to_serving_s"])),
        "coordinator kill -> serving (s)": (median(before["kill_to_serving_s"]), median(after["kill_to_serving_s"])),
    }
    print(f"\n{'':34} {'before':>10} {'after':>10} {'before/after':>13}")
    for label, (b, a) in rows.items():
        fmt = lambda v: f"{v:10.2f}" if v is not None else f"{'> ' + str(int(args.deadline_s)):>10}"  # noqa: E731
        ratio = f"{b / a:13.1f}" if a and b else f"{'-':>13}"
        print(f"{label:34} {fmt(b)} {fmt(a)} {ratio}")
    result = {"baseline_ref": args.baseline_ref, "kills": args.kills, "restarts": args.restarts,
              "deadline_s": args.deadline_s, "before": before, "after": after,
              "medians": {k: {"before": b, "after": a} for k, (b, a) in rows.items()},
              "note": "2-core machine shared with other work while measured"}
    if not args.skip_before:
        (Path(__file__).parent / "recovery.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
