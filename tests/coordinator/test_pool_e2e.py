"""A real pool on 127.0.0.1: `coordinator serve` and `provider join` processes, libp2p between them.

The default model is 513 MiB of float32 weights plus 30 × 6.3 MiB of KV cache (8 sessions × 512
tokens); a cap of 300 MiB a provider therefore forces three stages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import torch

from coordinator.local_pool import LocalPool
from coordinator.planner import (Links, ModelShape, Pipeline, Stage, Workload, choose_with_hysteresis, plan,
                                 provider_spec_from_profile)
from coordinator.planner.placement import DATACENTRE_LINK
from node.status import STATUS_FILE, WRITE_INTERVAL_S, read_status

CAP_MB = 300
MODEL = "smollm2-135m-instruct"
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):"]


def complete(pool: LocalPool, prompt: str, max_tokens: int) -> tuple[int, dict]:
    return pool.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                     api_key=pool.api_key)


def stages_of(state: dict) -> list[list[tuple[str, int, int]]]:
    return [[(s["peer"], s["start"], s["end"]) for s in p["stages"]] for p in state["pipelines"]]


def wait_settled(pool: LocalPool, n_stages: int | None = None) -> dict:
    """/pool with a pipeline over every layer, unchanged for a second."""
    def settled(state):
        if not state["pipelines"] or (n_stages and len(state["pipelines"][0]["stages"]) != n_stages):
            return False
        time.sleep(1.0)
        return stages_of(pool.get("/pool")) == stages_of(state)

    return pool.wait_for(settled, timeout_s=180.0, what="a settled plan")  # a newcomer is probed first


def test_memory_caps_force_three_stages_that_generate_like_transformers(pool, reference):
    state = wait_settled(pool, n_stages=3)
    [stages] = stages_of(state)
    assert [s[1] for s in stages] == [0, stages[0][2], stages[1][2]] and stages[-1][2] == 30
    assert len({s[0] for s in stages}) == 3
    providers = {p["peer"]: p for p in state["providers"]}
    assert all(providers[peer]["state"] == "serving" and providers[peer]["vouched"] for peer, _, _ in stages)
    assert all(providers[peer]["max_memory_bytes"] == CAP_MB * 2**20 for peer, _, _ in stages)
    for prompt in PROMPTS:
        status, body = complete(pool, prompt, 24)
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(prompt, 24)
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] <= 24
    # each stage keeps tensors only for the requests drawn for audit (p = 5 %), not for all three
    time.sleep(2 * WRITE_INTERVAL_S)  # status.json is rewritten every second
    kept = [read_status(pool.root / d)["retained_requests"] for d in os.listdir(pool.root)
            if (pool.root / d / STATUS_FILE).exists()]
    assert len(kept) == 3 and all(0 <= k < len(PROMPTS) for k in kept), kept


def test_a_forged_profile_gains_nothing(pool, default_model_dir):
    """A provider that signs a profile claiming 1000x its bandwidth and matmul rate joins a serving pool:
    the coordinator's probe measures it, records the contradiction, plans it at its measured speed, and
    the honest pipeline keeps its stages; believed, the claim would have moved the plan onto the forger.
    The ledger records the contradiction once as misconduct (reputation), replay reproduces it, and the
    honest providers' standing is untouched."""
    before = wait_settled(pool, n_stages=3)
    honest_before = {peer: pool.get(f"/ledger/accounts/{peer}?recent=0") for peer, _, _ in stages_of(before)[0]}
    forger = pool.add_provider("forger", max_memory_mb=CAP_MB, extra_args=["--fault-injection", "inflate-profile:1000"])

    def probed(state):
        measured = {p["peer"]: p["measured"] for p in state["providers"]}.get(forger)
        return bool(measured) and measured["source"] != "claim"

    pool.wait_for(probed, what="the forger probed")
    state = wait_settled(pool, n_stages=3)  # at least one planner round since the probe
    providers = {p["peer"]: p for p in state["providers"]}
    measured = providers[forger]["measured"]
    honest = [providers[peer]["measured"] for peer, _, _ in stages_of(before)[0]]
    assert measured["contradicted"] and measured["claim_ratio"] > 100
    assert not any(h["contradicted"] for h in honest)
    claimed = providers[forger]["profile"]["devices"][0]
    assert measured["mem_bandwidth_gb_per_s"] < claimed["mem_bandwidth_gb_per_s"] / 100  # planned as measured
    assert measured["mem_bandwidth_gb_per_s"] < 10 * max(h["mem_bandwidth_gb_per_s"] for h in honest)
    after = stages_of(state)
    if after != stages_of(before):
        # measured speeds are noisy on shared cores (the honest stages were probed while others loaded):
        # measurement may move a stage to the forger, the claim never gives it more than an honest share
        held = {peer: end - start for pipeline in after for peer, start, end in pipeline}
        assert held.get(forger, 0) <= max(end - start for _, start, end in stages_of(before)[0]), after
    assert state["measurements"]["contradictions_total"] >= 1
    assert any(e["peer"] == forger for e in state["measurements"]["events"])
    with urllib.request.urlopen(pool.api + "/metrics", timeout=30) as response:
        assert "meshpool_profile_contradictions_total 1.0" in response.read().decode()
    # had the coordinator believed the claim, the plan would have moved the forger in
    raw = json.loads((default_model_dir / "config.json").read_text())
    shape = ModelShape.from_hf_config(raw, name=MODEL, bytes_per_param=4.0, activation_bytes=4)
    workload = Workload(batch=pool.max_sessions, context_tokens=pool.context_tokens, microbatches_in_flight=1)
    on_claims = {peer: provider_spec_from_profile(peer, providers[peer]["profile"], CAP_MB)
                 for peer in [s[0] for s in stages_of(before)[0]] + [forger]}
    current = [Pipeline(tuple(Stage(*s) for s in stages_of(before)[0]))]
    fresh = plan(list(on_claims.values()), shape, workload).pipelines
    believed = choose_with_hysteresis(current, fresh, on_claims, shape, workload, Links(DATACENTRE_LINK))
    assert forger in {p for pipeline in believed for p in pipeline.peer_ids}
    status, body = complete(pool, PROMPTS[1], 8)  # and it serves
    assert status == 200, body
    # misconduct: one ledger entry, a reputation penalty, and the forger still may serve (re-planned, not benched)
    account = pool.get(f"/ledger/accounts/{forger}?recent=100")
    penalties = [e for e in account["recent_entries"] if e["kind"] == "misconduct"]
    assert len(penalties) == 1 and account["misconduct_count"] == 1, account
    assert penalties[0]["meta"]["evidence"]["claim_ratio"] > 100
    assert account["reputation"] == account["audits_agreed"] + account["audits_passed"] - 10  # no slash here
    assert {p["peer"]: p["state"] for p in pool.get("/pool")["providers"]}[forger] in ("idle", "serving")
    for peer, seen in honest_before.items():
        now = pool.get(f"/ledger/accounts/{peer}?recent=0")
        assert now["misconduct_count"] == 0 and now["reputation"] >= seen["reputation"]
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(pool.root / "coordinator")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ledger verify: OK" in done.stdout, done.stdout + done.stderr
    dashboard = {p["peer"]: p for p in pool.get("/dashboard/state")["providers"]}
    assert dashboard[forger]["misconduct_count"] == 1 and dashboard[forger]["reputation"] < 0


def test_kill_9_of_a_stage_mid_generation_changes_nothing_for_the_caller(pool, reference):
    pool.add_provider("spare", max_memory_mb=CAP_MB)
    [stages] = stages_of(wait_settled(pool, n_stages=3))
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("status", "body"), complete(pool, PROMPTS[0], 64))))
    worker.start()
    time.sleep(1.5)  # a few tokens in
    assert worker.is_alive(), "the generation ended before the kill"
    victim = stages[1][0]
    pool.kill(victim)
    worker.join(timeout=240)
    assert result["status"] == 200, result
    assert result["body"]["choices"][0]["text"] == reference(PROMPTS[0], 64)
    assert result["body"]["usage"]["completion_tokens"] == 64
    state = wait_settled(pool, n_stages=3)
    assert victim not in {s[0] for s in stages_of(state)[0]}
    assert {p["peer"]: p["state"] for p in state["providers"]}[victim] == "dead"
    # seen dead by its connection closing, not by heartbeats running out
    assert f"provider {victim}: connection closed" in pool.coordinator.log()


def test_join_and_leave_replan_without_dropping_requests(pool, reference):
    wait_settled(pool)
    results: dict[int, tuple[int, dict]] = {}

    def run(i: int):  # long enough to still run when the re-plan for the join has settled
        results[i] = complete(pool, PROMPTS[0], 120)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    joined = pool.add_provider("late", max_memory_mb=CAP_MB)  # a join re-plans while requests run
    [stages] = stages_of(wait_settled(pool))
    assert any(w.is_alive() for w in workers), "the requests ended before the leave"
    leaver = stages[0][0]
    assert pool.leave(leaver) == 0  # SIGTERM: drains, announces its leave, exits cleanly
    for w in workers:
        w.join(timeout=300)
    expected = reference(PROMPTS[0], 120)
    for i, (status, body) in sorted(results.items()):
        assert status == 200, body
        assert body["choices"][0]["text"] == expected
    state = wait_settled(pool)
    peers = {p["peer"]: p["state"] for p in state["providers"]}
    assert joined in peers and peers[leaver] == "dead"
    assert leaver not in {s[0] for p in stages_of(state) for s in p}


def test_requests_join_and_leave_micro_batches_in_flight_and_survive_a_kill(pool, reference):
    """Several clients start one after another (joining running micro-batches), short requests end
    while long ones run (leaving them), a long prompt is prefilled in chunks among them, and stage 0
    is killed with steps of several micro-batches in flight: every request still gets the
    reference's greedy text."""
    pool.add_provider("spare2", max_memory_mb=CAP_MB)
    [stages] = stages_of(wait_settled(pool, n_stages=3))
    jobs = [(PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate((4, 14, 6, 18, 8, 16))]
    jobs[4] = (" ".join(PROMPTS) * 16, 8)  # over 256 tokens: prefilled in chunks between decode steps
    results: dict[int, tuple[int, dict]] = {}
    workers = [threading.Thread(target=lambda i=i: results.update({i: complete(pool, *jobs[i])}))
               for i in range(len(jobs))]
    for w in workers:
        w.start()
        time.sleep(0.3)  # each joins while the ones before it decode
    time.sleep(0.5)
    assert sum(w.is_alive() for w in workers) >= 3, "too few requests still running before the kill"
    pool.kill(stages[0][0])
    for w in workers:
        w.join(timeout=300)
    for i, (prompt, n) in enumerate(jobs):
        status, body = results[i]
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(prompt, n), (i, prompt, n)


def test_hostile_peers_are_dropped_and_the_pool_keeps_serving(pool, reference, tmp_path):
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    from node.transport import P2PNode, encode_frame
    from wire.frames import MAGIC, PREFIX
    from wire.messages import PROTO_CONTROL, PROTO_STAGE, Register, SamplingParams, Step, decode

    state = wait_settled(pool)
    [stages] = stages_of(state)
    stage1_addr = next(p["addrs"][0] for p in state["providers"] if p["peer"] == stages[1][0])

    def as_rogue(addr: str, act):
        """A fresh libp2p peer for each misdeed: the receiver hangs up on a peer after a bad frame."""
        rogue = P2PNode()
        rogue.start()
        try:
            return act(rogue, rogue.connect(addr))
        finally:
            rogue.close()

    def send_raw(addr: str, protocol: str, data: bytes):
        def act(rogue, peer):
            async def go():
                ns = await rogue._host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
                await ns.write(data)
                try:
                    while await ns.read(100):
                        pass
                except Exception:  # the reset we expect
                    pass
            rogue.call(20, go)
        as_rogue(addr, act)

    send_raw(pool.p2p_addr, PROTO_CONTROL, b"\x00garbage" * 100)  # not a frame
    send_raw(pool.p2p_addr, PROTO_CONTROL, PREFIX.pack(MAGIC, 16, 1 << 40))  # a 1 TB frame
    # a registration whose signature does not match the sender
    forged = as_rogue(pool.p2p_addr, lambda rogue, peer: rogue.request(peer, PROTO_CONTROL, Register(
        {}, (), 1, b"\x00" * 32, b"\x00" * 64).to_frame()))
    reply = decode(forged)
    assert not reply.ok and reply.reason == "the profile's signature does not match the peer id"
    # a step with the wrong hidden size, sent to a middle stage by a peer that is not its upstream
    bad = Step(state["pipelines"][0]["id"], 1, "decode", ("x",), (0,), (SamplingParams(),), (), torch.zeros(1, 7))
    send_raw(stage1_addr, PROTO_STAGE, encode_frame(bad.to_frame()))

    log = pool.coordinator.log()
    assert "dropping stream /meshpool/control/1" in log and "bad magic" in log and "exceeds the limit" in log
    stage_log = next(p for peer, p in pool.providers.items() if peer == stages[1][0]).log()
    assert "not the upstream of pipeline" in stage_log
    assert stages_of(pool.get("/pool")) == [stages]  # nothing else changed
    status, body = complete(pool, PROMPTS[1], 16)
    assert status == 200 and body["choices"][0]["text"] == reference(PROMPTS[1], 16)


def test_errors_are_clear(pool):
    status, body = complete(pool, PROMPTS[0], 0)
    assert status == 422 and body["error"]["type"] == "invalid_request_error"
    status, body = pool.post("/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2},
                             api_key=pool.api_key)
    assert status == 404 and "not served here" in body["error"]["message"]


# The two below restart the coordinator and try a twin of a provider: they run last.

SERVE_AGAIN_DEADLINE_S = 180.0  # generous: the machine is shared; bench/recovery.py has the figure


def complete_once(pool: LocalPool, max_tokens: int = 12) -> tuple[int, dict]:
    return pool.post("/v1/completions", {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": max_tokens,
                                         "temperature": 0}, timeout_s=60, api_key=pool.api_key)


def standing(pool: LocalPool, peer: str) -> dict:
    return pool.get(f"/ledger/accounts/{peer}?recent=0")


def test_a_restarted_coordinator_gets_its_pool_back_and_providers_keep_their_standing(pool, reference):
    status, body = complete_once(pool)
    assert status == 200 and body["choices"][0]["text"] == reference(PROMPTS[1], 12)
    peers = sorted(pool.providers)
    before = {peer: standing(pool, peer) for peer in peers}
    assert all(b["stake_units"] > 0 for b in before.values())  # vouched: the operator funded their stakes

    pool.kill_coordinator()  # kill -9; the providers stay up
    pool.start_coordinator()  # the same command, data directory and p2p port
    deadline = time.monotonic() + SERVE_AGAIN_DEADLINE_S
    while True:
        try:
            status, body = complete_once(pool)
        except OSError:  # waiting longer than the client's timeout for a pipeline: ask again
            status, body = 0, {}
        if status == 200 or time.monotonic() > deadline:
            break
        # meanwhile the pool says why, in OpenAI's shape, and when to ask again
        assert status in (0, 503), body
        if status == 503:
            assert body["error"]["code"] == "no_pipeline" and body["error"]["message"].startswith("no pipeline")
        time.sleep(0.5)
    assert status == 200, body
    assert body["choices"][0]["text"] == reference(PROMPTS[1], 12)

    assert all(proc.popen.poll() is None for proc in pool.providers.values())  # the same processes
    # a plan needs three of them: the others may still be between redials (at most 2 s apart)
    state = pool.wait_for(lambda s: sorted(p["peer"] for p in s["providers"]) == peers, 60, "every provider back")
    records = {p["peer"]: p for p in state["providers"]}
    assert all(records[p]["vouched"] and records[p]["state"] in ("serving", "idle") for p in peers)
    # a pipeline over every layer again (how many stages depends on what the restarted planner measured)
    stages = state["pipelines"][0]["stages"]
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 30
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:])) and {s["peer"] for s in stages} <= set(peers)
    for peer in peers:  # the standing the ledger keeps came back with it
        after = standing(pool, peer)
        assert after["stake_units"] == before[peer]["stake_units"] and after["may_serve"] == before[peer]["may_serve"]
        assert after["slash_count"] == before[peer]["slash_count"] == 0
        assert after["reputation"] >= before[peer]["reputation"]  # honest audits only add
        assert "registering again" in pool.providers[peer].log()


def test_one_peer_id_serves_from_one_process(pool, tmp_path):
    peer, proc = next(iter(pool.providers.items()))
    was = {p["peer"]: p["state"] for p in pool.get("/pool")["providers"]}[peer]
    data_dir = pool.root / proc.name
    join = [sys.executable, "-m", "node.cli", "join", pool.p2p_addr, "--device", "cpu", "--quick-profile",
            "--max-memory-mb", str(CAP_MB), "--data-dir"]
    # the same data directory: refused by its lock before anything is dialled
    same = subprocess.run(join + [str(data_dir)], capture_output=True, text=True, timeout=120)
    assert same.returncode == 1 and "provider ready" not in same.stdout
    assert f"already serves with the key in {data_dir}" in same.stderr

    # a copy of the key elsewhere: the coordinator refuses it, naming the reason
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(data_dir / "node_ed25519.key", copy)
    other = subprocess.run(join + [str(copy)], capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "provider ready" not in other.stdout
    assert f"peer id {peer} is live in another process" in other.stderr

    assert proc.popen.poll() is None  # the one serving is untouched and serves on
    status, _ = complete_once(pool, 4)
    assert status == 200
    assert {p["peer"]: p["state"] for p in pool.get("/pool")["providers"]}[peer] == was
