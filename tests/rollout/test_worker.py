"""RolloutWorker on the tiny model, in-process."""

import torch

from base_model.sampler import SamplingConfig
from rollout.batch import sample_seed
from rollout.prompts import Prompt, prompt_id
from rollout.worker import RolloutWorker

SAMPLING = SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=4)


def _prompts(*texts):
    return [Prompt(prompt_id(t), t) for t in texts]


def test_rollout_groups_seeds_and_shapes():
    w = RolloutWorker("tiny", SAMPLING, micro_batch_samples=3)
    batch = w.rollout(_prompts("a red circle", "a blue square"), samples_per_prompt=4, record_chains=True)
    assert len(batch) == 8 and batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.images.shape == (8, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.chains.shape == (8, 16, 5, 64) and batch.log_probs.shape == (8, 16, 4)
    assert batch.seeds[5] == sample_seed(prompt_id("a blue square"), 1, 0)
    assert len(set(batch.seeds.tolist())) == 8
    kept = batch.select([4, 5])
    assert kept.prompts == ["a blue square"] * 2 and kept.chains.shape[0] == 2


def test_a_prompt_gives_the_same_samples_on_any_worker_and_batch():
    a = RolloutWorker("tiny", SAMPLING, micro_batch_samples=16).rollout(_prompts("x", "a cat"), 2)
    b = RolloutWorker("tiny", SAMPLING, micro_batch_samples=1).rollout(_prompts("a cat"), 2)
    torch.testing.assert_close(a.tokens[2:], b.tokens, atol=1e-4, rtol=1e-4)


def test_load_weights_bumps_the_policy_version():
    w = RolloutWorker("tiny", SAMPLING)
    state = {k: v.clone() * 0 for k, v in w.bundle.model.state_dict().items()}
    assert w.load_weights(state, version=3) == 3 and w.policy_version == 3
    assert float(w.bundle.model.lm_head.weight.abs().sum()) == 0.0
