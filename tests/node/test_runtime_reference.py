"""Chained shards against transformers running the whole model in one process."""

from __future__ import annotations

import pytest
import torch

from node.local_pipeline import LocalPipeline
from tests.node.random_models import make_random_model

N_NEW = 40


def reference_greedy(model, prompt: list[int], n_new: int, eos=None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("ranges", [[(0, 13), (13, 30)], [(0, 4), (4, 21), (21, 30)]], ids=["2-way", "3-way"])
def test_default_model_chained_shards_match_transformers(default_model_dir, default_reference, ranges):
    model, tokenizer = default_reference
    prompt = chat_ids(tokenizer, "Write a short story about a robot who learns to paint.")
    eos = model.generation_config.eos_token_id
    expected = reference_greedy(model, prompt, N_NEW, eos=eos)
    assert len(expected) >= 32, "the prompt must produce at least 32 tokens before end of turn"

    pipeline = LocalPipeline.load(default_model_dir, ranges)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    assert pipeline.generate([prompt], N_NEW, stop_ids=eos_ids) == [expected]


def test_default_model_answers_the_documented_question(default_model_dir, default_reference):
    _, tokenizer = default_reference
    pipeline = LocalPipeline.load(default_model_dir, [(0, 10), (10, 30)])
    [tokens] = pipeline.generate([chat_ids(tokenizer, "What is the capital of France?")], 20, stop_ids=(2,))
    assert tokenizer.decode(tokens, skip_special_tokens=True).strip() == "The capital of France is Paris."


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def random_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return make_random_model(request.param, path), path


@pytest.mark.parametrize("ranges", [[(0, 3), (3, 6)], [(0, 1), (1, 4), (4, 6)]], ids=["2-way", "3-way"])
def test_random_models_generate_like_transformers(random_model, ranges):
    model, path = random_model
    prompt = [5, 17, 33, 2, 99, 100, 7, 250]
    expected = reference_greedy(model, prompt, 32)
    assert LocalPipeline.load(path, ranges).generate([prompt], 32) == [expected]


def test_random_models_hidden_states_match_at_every_boundary(random_model):
    model, path = random_model
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    pipeline = LocalPipeline.load(path, [(0, 2), (2, 5), (5, 6)])
    x = ids[0]
    for stage in pipeline.stages:
        x = stage.prefill("s", x, all_positions=True)
        if not stage.shard.is_last:
            # hidden_states[k] is the input of layer k, i.e. the output of a shard ending at k
            assert_close_to_scale(x, reference.hidden_states[stage.shard.end][0])
    assert_close_to_scale(x, reference.logits[0])


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding at the tensor's scale: the CPU weights' layout
    (layers.input_major_) sums each product in another order than transformers, which moves
    an element by up to ~3e-6 of the largest one (these wide random models reach ~90)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=max(1e-4, 1e-5 * float(expected.abs().max())))


def test_batched_decode_of_uneven_sessions_matches_each_alone(random_model):
    model, path = random_model
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300, 400, 500]]
    expected = [reference_greedy(model, p, 16) for p in prompts]
    pipeline = LocalPipeline.load(path, [(0, 2), (2, 6)], max_sessions=6)
    # free slot 0 and hold slot 1, so that the batch's slots are not one consecutive run (gather path)
    pipeline.prefill("first", [1, 2])
    pipeline.prefill("blocker", [1, 2])
    pipeline.close("first")
    assert pipeline.generate(prompts, 16) == expected
    pipeline.close("blocker")
    assert pipeline.generate(prompts, 16) == expected  # consecutive slots (the view path)


def test_prompt_fed_in_chunks_continues_like_one_prefill(random_model):
    """Replay after failover feeds prompt plus produced tokens; it must continue identically."""
    _, path = random_model
    pipeline = LocalPipeline.load(path, [(0, 3), (3, 6)])
    tokens = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    whole = pipeline.prefill("whole", tokens)
    pipeline.prefill("chunked", tokens[:4])
    pipeline.prefill("chunked", tokens[4:7])
    chunked = pipeline.prefill("chunked", tokens[7:])
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    # and decoding after the chunks matches decoding after the single prefill
    torch.testing.assert_close(pipeline.decode(["chunked"], [3]), pipeline.decode(["whole"], [3]), atol=1e-4, rtol=1e-4)
