"""Fixtures of the coordinator's end-to-end tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def reference(default_reference):
    """Greedy text of `transformers` in one process, for a prompt or a list of chat messages."""
    model, tokenizer = default_reference

    def greedy(ids: list[int], max_tokens: int) -> str:
        ids = torch.tensor([ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def text(prompt, max_tokens: int) -> str:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return greedy(list(ids["input_ids"] if hasattr(ids, "keys") else ids), max_tokens)
        return greedy(tokenizer(prompt)["input_ids"], max_tokens)

    return text
