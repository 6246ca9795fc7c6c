"""A real pool whose providers are two GPUs of one host (`provider join --device cuda:0` and
`--device cuda:1`): both serve, and the text is the CPU reference's; two providers on one GPU keep
one micro-batch in flight (they would only take turns on it).

On a host with two GPUs:
    python -m pytest tests/coordinator/test_pool_gpus.py -q
"""

from __future__ import annotations

import pytest
import torch

from coordinator.local_pool import LocalPool

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TWO_STAGE_CAP_MB = 400  # the default model in float32 with its KV cache needs ~700 MiB: two stages
MODEL = "smollm2-135m-instruct"


@pytest.mark.skipif(N_GPUS < 2, reason="needs two CUDA devices")
def test_two_gpus_of_one_host_serve_one_pipeline(tmp_path, default_model_dir, reference):
    pool = LocalPool(tmp_path)
    try:
        pool.start_coordinator()
        for index in (0, 1):  # float32, so the text is the CPU reference's token for token
            pool.add_provider(f"gpu{index}", max_memory_mb=TWO_STAGE_CAP_MB,
                              extra_args=["--device", f"cuda:{index}", "--dtype", "float32"])
        pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == 2, 180, "2 stages")
        key = pool.add_consumer("gpus", 10**12)
        prompt = "The three primary colors are"
        status, body = pool.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 24,
                                                     "temperature": 0}, api_key=key)
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(prompt, 24)
        state = pool.get("/pool")
        assert len(state["pipelines"]) == 1 and not state["plan_error"]
        assert state["pipelines"][0]["microbatches"] == 2  # two GPUs work at once: one micro-batch each
        assert all(p["state"] == "serving" for p in state["providers"])
    finally:
        pool.stop()


@pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA device")
def test_two_stages_on_one_gpu_keep_one_micro_batch(tmp_path, default_model_dir, reference):
    pool = LocalPool(tmp_path)
    try:
        pool.start_coordinator()
        for name in ("a", "b"):
            pool.add_provider(name, max_memory_mb=TWO_STAGE_CAP_MB,
                              extra_args=["--device", "cuda:0", "--dtype", "float32"])
        pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == 2, 180, "2 stages")
        assert pool.get("/pool")["pipelines"][0]["microbatches"] == 1  # the stages take turns on the GPU
        key = pool.add_consumer("gpu", 10**12)
        prompt = "The three primary colors are"
        status, body = pool.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 24,
                                                     "temperature": 0}, api_key=key)
        assert status == 200 and body["choices"][0]["text"] == reference(prompt, 24), body
    finally:
        pool.stop()
