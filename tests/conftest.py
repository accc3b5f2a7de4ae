"""Shared fixtures: a real tokenizer trained on the embedded text and tiny models built
from real architecture configs (random weights), saved as ordinary checkpoints."""
from __future__ import annotations

import os
from pydoc_data.topics import topics

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<bos>"])
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                   model_max_length=4096)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


def save_tiny_model(path, tokenizer, layers: int = 4, model_type: str = "llama", seed: int = 0):
    """A real Llama-architecture checkpoint with random weights, small enough for CPU tests."""
    from core.models import from_config, tiny_config

    config = tiny_config(model_type, layers=layers, vocab=len(tokenizer))
    loaded = from_config(config, torch.device("cpu"), torch.float32, seed=seed)
    loaded.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA is present and skip elsewhere (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
