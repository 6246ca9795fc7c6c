"""The `provider` command as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROVIDER = [sys.executable, "-m", "node.cli"]


def run(args, env=None, timeout=300):
    return subprocess.run(PROVIDER + args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_models_lists_the_default_first_with_an_absolute_path(default_model_dir, tmp_path):
    # a cache dir holding the default model, another servable model and a broken one
    cache = tmp_path / "models"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_model_dir)
    (cache / "zz-unsupported").mkdir()
    (cache / "zz-unsupported" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    from tests.node.random_models import make_random_model

    make_random_model("llama", cache / "Tiny-Llama", n_layers=2)
    result = run(["models"], env={"MESHPOOL_MODELS": str(cache)})
    assert result.returncode == 0, result.stderr
    lines = [line.split(" ", 1) for line in result.stdout.splitlines()]
    assert lines[0][0] == "smollm2-135m-instruct" and Path(lines[0][1]).is_absolute()
    assert (Path(lines[0][1]) / "config.json").is_file()
    assert lines[1:] == [["tiny-llama", str((cache / "Tiny-Llama").resolve())]]


def test_profile_prints_measured_figures_per_device():
    result = run(["profile", "--quick", "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    profile = json.loads(result.stdout)
    assert profile["host"]["cpu_cores"] >= 1 and profile["host"]["ram_total_bytes"] > 2**30
    [cpu] = profile["devices"]
    assert cpu["kind"] == "cpu" and cpu["dtype"] == "float32"
    assert cpu["mem_bandwidth_gb_per_s"] > 0.1 and cpu["matmul_tflops"] > 0.001
    assert 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]


def test_demo_generates_through_chained_shards(default_model_dir):
    result = run(["demo", "--max-new-tokens", "12", "--batch", "2"])
    assert result.returncode == 0, result.stderr
    assert "stages [(0, 15), (15, 25), (25, 30)]" in result.stdout
    assert "The capital of France is Paris." in result.stdout
    assert "tokens/s" in result.stdout


def test_bad_model_directory_is_a_clear_error(tmp_path):
    result = run(["demo", "--model", str(tmp_path)])
    assert result.returncode == 2
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["provider", "coordinator", "ledger"])
def test_console_scripts_are_installed(command):
    assert shutil.which(command, path=str(Path(sys.executable).parent)), f"{command} not on the venv's PATH"
