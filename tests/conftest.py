"""Test environment: offline, deterministic, two CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import base_model  # noqa: E402,F401  (torchvision shim before anything imports transformers)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for every `ray` test of the session (about 4 s); shut it down at the end."""
    import ray

    from core.pools import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def chatty():
    """A random tiny bundle whose lm_head favours <|image_area|> (a bias of +4 on its logit): Self-CoT texts of
    varied lengths that stop by themselves (a random model's own texts run into max_text_tokens)."""
    from torch import nn

    from base_model.checkpoint import build_random

    bundle = build_random("tiny", seed=0)
    model = bundle.model
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[bundle.ids.image_area] = 4.0
    model.lm_head = head
    return bundle
