"""The README's demo command, as a user runs it (here with --once so that it ends by itself)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_pool_answers_through_an_asymmetric_pipeline(tmp_path, default_model_dir):
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "--once", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("joined with --max-memory-mb") == 3
    ranges = [line.split("[", 1)[1].split(")", 1)[0] for line in out.splitlines() if "stage layers" in line]
    assert ranges[0].startswith(" 0,") and ranges[-1].endswith("30")
    assert len({int(r.split(",")[1]) - int(r.split(",")[0]) for r in ranges}) > 1, "stages of unequal length"
    assert "tokens/s through" in out
