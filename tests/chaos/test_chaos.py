"""Seeded chaos in CI: short seeds of bench/chaos.py against a real pool, every invariant checked.

One pool, started as a user starts one, takes the seeds in turn (one pool start for all: CI's time
is short). Each seed kills (-9) and stops (SIGSTOP) providers on its schedule while consumers send
greedy requests through the `openai` client and every process's transport drops, delays and
duplicates frames; then the consumer model checks conservation, `ledger verify`, that no honest
provider was slashed, and that every request answered the reference text or was refunded exactly.
Coordinator faults join in when bench.chaos.COORDINATOR_FAULTS_IN_CI is flipped. `python
bench/chaos.py --seed N --minutes M` runs long seeds."""

from __future__ import annotations

from bench.chaos import COORDINATOR_FAULTS_IN_CI, Reference, make_schedule, run

CI_SEEDS = (1, 2)
CI_MINUTES = 0.25


def test_one_seed_derives_one_schedule():
    a, b = make_schedule(5, 30, coordinator_faults=True), make_schedule(5, 30, coordinator_faults=True)
    assert a == b and a.describe() == b.describe()
    assert a != make_schedule(6, 30, coordinator_faults=True)
    assert {f.kind for f in a.faults} == {"kill", "stop"} and "coordinator" in {f.target for f in a.faults}
    assert all(later.at_s >= f.at_s + f.for_s for f, later in zip(a.faults, a.faults[1:]))  # one at a time
    assert "coordinator" not in {f.target for f in make_schedule(5, 30).faults}
    assert len(set(a.frame_faults.values())) == len(a.frame_faults)  # each process its own frame seed
    assert make_schedule(5, 30, drop=0, dup=0, delay=0).frame_faults == {}


def test_chaos_seeds_keep_every_invariant(tmp_path, default_reference):
    reports = run(CI_SEEDS, CI_MINUTES, tmp_path, Reference(*default_reference), COORDINATOR_FAULTS_IN_CI)
    assert [r.seed for r in reports] == list(CI_SEEDS)
    for report in reports:
        assert sum(report.process_faults.values()) >= 1, report.summary()
        assert report.answered > 0, report.summary()
        assert report.violations == [], report.summary()
    assert sum(sum(r.frame_faults.values()) for r in reports) >= 1
