"""The prompt-method tests' model builders (tests/testing_utils.py) are deterministic and use GQA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from testing_utils import batch, twin  # noqa: E402
from testing_utils import prompt_tiny_llama as tiny_llama  # noqa: E402


def test_builders_are_deterministic_and_gqa():
    a, b = twin(tiny_llama)
    assert a.config.num_key_value_heads * 2 == a.config.num_attention_heads
    ids, mask, _ = batch()
    assert torch.equal(a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits)
