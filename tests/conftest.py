"""Fixtures shared across packages: the default model and small random models saved to disk."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_dir():
    from node.models import default_model_dir as ensure

    return ensure()


@pytest.fixture(scope="session")
def default_reference(default_model_dir):
    """transformers' own model and tokenizer for the default model: the reference to agree with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)
