"""Fixtures of the verification tests: the default model loaded once, requests served through
ShardRuntime as stages serve them, and the recomputer."""

from __future__ import annotations

import pytest
import torch

from bench.audit_calibration import build_stages, load_tensors, serve
from node.models import model_id_of
from tests.verification.serving import NEW_TOKENS, PROMPTS
from node.layer_reference import LayerAuditor
from node.recompute import Recomputer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the machine running the tests is small and shared (more threads only spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model(default_model_dir):
    config, tensors = load_tensors(default_model_dir)
    return default_model_dir, config, tensors, model_id_of(default_model_dir)


@pytest.fixture(scope="session")
def recomputer(default_model_dir):
    return Recomputer(default_model_dir, max_cached=6)


@pytest.fixture(scope="session")
def auditor(default_model_dir):
    return LayerAuditor(default_model_dir, max_cached=6)


@pytest.fixture(scope="session")
def run_pool(model):
    """run_pool(dtypes, batch, weights, fault_at, fault, chunks, prompts) -> records[prompt][stage]: requests
    served by 3 stages [0,10) [10,20) [20,30) of the given dtypes, with `fault` on stage `fault_at`."""
    model_dir, config, tensors, model_id = model

    def run(dtypes, batch=1, weights=None, fault_at=None, fault=None, chunks=1, prompts=PROMPTS):
        stages = build_stages(config, weights or tensors, model_id, dtypes, fault_at, fault)
        faults = {fault_at: fault} if fault is not None else None
        return serve(stages, prompts, batch, chunks, faults=faults, max_new_tokens=NEW_TOKENS)

    return run
