import pytest
import torch

from base_model.checkpoint import build_random


@pytest.fixture(scope="module")
def tiny():
    """A random tiny bundle (model, byte tokenizer, special ids, VAE), fp32, eval mode."""
    torch.manual_seed(0)
    return build_random("tiny", seed=0)
