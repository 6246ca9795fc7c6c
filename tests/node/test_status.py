"""The provider's own view: ProviderStats counters, status.json written atomically, the status
line on a TTY (and nothing elsewhere), and `provider status --data-dir DIR`."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import threading
import time

import pytest

from node.status import STATUS_FILE, ProviderStats, StatusLine, StatusWriter, read_status, write_status


def test_counters_are_thread_safe_and_round_trip():
    stats = ProviderStats(peer="12D3KooWpeer")
    workers = [threading.Thread(target=lambda: [stats.add_step(3) for _ in range(2000)]) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats.add_audit(credits_units=7)
    stats.add_credits(100)
    stats.add_stage(0, 12)
    stats.add_stage(0, 12)
    stats.add_stage(20, 30)
    stats.remove_stage(20, 30)
    stats.update(state="serving", reputation=5)
    with pytest.raises(TypeError):
        stats.update(api_key="nope")
    d = stats.to_dict()
    assert d["steps"] == 8000 and d["tokens_processed"] == 24000 and d["audits_done"] == 1
    assert d["credits_earned_units"] == 107 and d["stages"] == [[0, 12]] and d["state"] == "serving"
    assert d["updated_ms"] > 0 and set(d) == {"peer", "state", "stages", "tokens_processed", "steps",
                                              "credits_earned_units", "reputation", "audits_done", "retained_requests",
                                              "retained_bytes", "updated_ms"}
    assert ProviderStats.from_dict(json.loads(json.dumps(d))).to_dict() == d
    assert stats.line().startswith("serving [0, 12) · 24,000 tokens · 8,000 steps · 107 credits")


def test_status_file_is_replaced_atomically_and_read_back(tmp_path):
    stats = ProviderStats(peer="p", state="serving", stages=[[0, 6]])
    seen, stop = [], threading.Event()

    def reader():  # never sees a half-written file
        while not stop.is_set():
            try:
                seen.append(json.loads((tmp_path / STATUS_FILE).read_text())["peer"])
            except FileNotFoundError:
                pass

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        stats.add_step(1)
        write_status(tmp_path, stats)
    stop.set()
    thread.join()
    assert seen and set(seen) == {"p"}
    status = read_status(tmp_path)
    assert status["steps"] == 200 and status["running"] is True and status["age_s"] < 5
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_FILE]  # no temporary file left behind


def test_writer_ticks_and_final_state(tmp_path):
    stats = ProviderStats(peer="p")
    line_out = io.StringIO()
    writer = StatusWriter(tmp_path, stats, StatusLine(line_out), interval_s=0.05).start()
    stats.add_step(5)
    time.sleep(0.3)
    assert read_status(tmp_path)["tokens_processed"] == 5
    writer.stop()
    assert read_status(tmp_path)["state"] == "stopped"
    assert line_out.getvalue() == ""  # not a TTY: the status line stays silent


def test_status_line_redraws_one_line_on_a_tty():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            line = StatusLine(tty, width=60)
            assert line.enabled
            stats = ProviderStats(state="serving", stages=[[0, 6]])
            line.update(stats)
            stats.add_step(10)
            line.update(stats)
            line.clear()
            line.clear()  # nothing shown: nothing to erase
            line.show("x")
            assert line.log_filter(None) is True  # a log record erases the line first
        out = os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert out.count("\r\x1b[2K") == 5 and "\n" not in out
    assert "serving [0, 6) · 10 tokens" in out
    assert all(len(part) <= 59 for part in out.split("\r\x1b[2K"))


def test_provider_status_command(tmp_path):
    def status(*args):
        return subprocess.run([sys.executable, "-m", "node.cli", "status", *args], capture_output=True, text=True,
                              timeout=60)

    missing = status("--data-dir", str(tmp_path))
    assert missing.returncode == 1 and "no status" in missing.stderr
    stats = ProviderStats(peer="12D3KooWx", state="serving", stages=[[6, 21]], tokens_processed=42, steps=3,
                          credits_earned_units=1200, reputation=2, audits_done=1)
    write_status(tmp_path, stats)
    done = status("--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert {k: shown[k] for k in stats.to_dict()} == stats.to_dict() and shown["running"] is True
    (tmp_path / STATUS_FILE).write_text("[1, 2")
    assert status("--data-dir", str(tmp_path)).returncode == 1
