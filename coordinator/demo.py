"""`coordinator demo`: a local pool of one coordinator and several providers with different memory
caps (so the planner builds an asymmetric pipeline), one example request, then serve until Ctrl-C."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path

from coordinator.local_pool import LocalPool

# Different memory caps, as different devices would have: together they hold the default model
# (513 MiB of float32 weights plus KV cache), none of them alone.
DEMO_CAPS_MB = (380, 300, 240)
PROMPT = "Here is a short poem about computers sharing their work:\n"


def run_demo(root: Path | None, once: bool, max_tokens: int = 48) -> int:
    root = Path(root or tempfile.mkdtemp(prefix="meshpool-demo-"))
    pool = LocalPool(root)
    try:
        print(f"starting a coordinator and {len(DEMO_CAPS_MB)} providers (logs in {root})", flush=True)
        pool.start_coordinator()
        for i, cap_mb in enumerate(DEMO_CAPS_MB):
            peer = pool.add_provider(f"provider{i}", max_memory_mb=cap_mb)
            print(f"  provider {peer} joined with --max-memory-mb {cap_mb}", flush=True)
        [pipeline] = pool.wait_for_pipelines(1)["pipelines"][:1]
        for stage in pipeline["stages"]:
            print(f"  stage layers [{stage['start']:>2}, {stage['end']:>2}) on {stage['peer']}")

        api_key = pool.add_consumer("demo", 10**9)
        body = {"model": pool.get("/v1/models")["data"][0]["id"], "prompt": PROMPT, "max_tokens": max_tokens,
                "temperature": 0}
        start = time.perf_counter()
        status, reply = pool.post("/v1/completions", body, api_key=api_key)
        seconds = time.perf_counter() - start
        if status != 200:
            print(f"request failed: {status} {reply}")
            return 1
        n = reply["usage"]["completion_tokens"]
        print(f"\n> {PROMPT.strip()}\n{reply['choices'][0]['text']}\n")
        print(f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s through {len(pipeline['stages'])} "
              f"stages over libp2p")
        if once:
            return 0
        print(f"\nthe pool serves at {pool.api} (GET /pool, POST /v1/completions); Ctrl-C stops it\n"
              f"  curl -s {pool.api}/v1/completions -H 'Content-Type: application/json' "
              f"-H 'Authorization: Bearer {api_key}' "
              f"-d '{{\"model\": \"{body['model']}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        return 0
    finally:
        pool.stop()
