"""Composite reward arithmetic, running normalisation, RewardWorker in-process and as a Ray actor."""

import pytest
import torch

from core.pools import LocalPool, PoolConfig, RayPool, make_pool
from core.schema import from_dict
from rewards.base import RewardOutput, RewardsConfig
from rewards.composite import CompositeReward, RunningNorm, build_composite
from rewards.worker import RewardWorker
from tests.rewards.helpers import random_images


class Constant:
    """A reward returning fixed scores and one sub-score."""

    def __init__(self, name, values):
        self.name, self.values = name, torch.tensor(values)

    def __call__(self, images, prompts):
        return RewardOutput(self.values[: len(prompts)], {"half": self.values[: len(prompts)] / 2})


def norm(kind="none", **kw):
    from rewards.base import NormalizeConfig

    return NormalizeConfig(kind, **kw)


def test_weights_and_components_add_up():
    a, b = Constant("a", [1.0, 2.0]), Constant("b", [10.0, -10.0])
    composite = CompositeReward([("a", a, 0.5, norm()), ("b", b, 2.0, norm("affine", shift=10.0, scale=4.0))])
    out = composite(random_images(2), ["x", "y"])
    # 0.5 * [1, 2] + 2 * ([10, -10] - 10) / 4 = [0.5, 1] + [0, -10]
    torch.testing.assert_close(out.scores, torch.tensor([0.5, -9.0]))
    assert sorted(out.components) == ["a", "a/half", "b", "b/half", "b/normalized"]
    torch.testing.assert_close(out.components["b"], torch.tensor([10.0, -10.0]))
    torch.testing.assert_close(out.components["b/normalized"], torch.tensor([0.0, -5.0]))
    recomputed = 0.5 * out.components["a"] + 2.0 * out.components["b/normalized"]
    torch.testing.assert_close(out.scores, recomputed)


def test_running_norm_matches_mean_and_std_of_everything_seen():
    rn, seen = RunningNorm(eps=0.0), []
    for batch in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])):
        seen.append(batch)
        everything = torch.cat(seen).double()
        out = rn(batch)
        expected = (batch.double() - everything.mean()) / everything.std(unbiased=False)
        torch.testing.assert_close(out.double(), expected)
    restored = RunningNorm(eps=0.0)
    restored.load_state_dict(rn.state_dict())
    assert (restored.count, restored.mean, restored.std) == (6, rn.mean, rn.std)


JPEG_AND_CLIP = {
    "rewards": [
        {"name": "jpeg", "type": "jpeg", "weight": 0.1, "normalize": {"kind": "running"}},
        {"name": "clip", "type": "clipscore", "params": {"size": "tiny", "init": "random"}},
    ],
    "micro_batch_images": 2,
}


def test_worker_micro_batches_do_not_change_scores():
    images, prompts = random_images(5, 40, 40), [f"prompt {i}" for i in range(5)]
    small = RewardWorker(from_dict(RewardsConfig, JPEG_AND_CLIP))
    whole = build_composite(from_dict(RewardsConfig, {**JPEG_AND_CLIP, "micro_batch_images": 32}))
    a, b = small.score(images, prompts), whole(images, prompts)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
    assert set(a.components) == {"jpeg", "jpeg/size_kb", "jpeg/normalized", "clip", "clip/cosine"}
    assert small.state_dict()["jpeg"]["count"] == 5  # running statistics updated once, over the batch


def test_local_pool_keeps_order_and_broadcasts():
    pool = LocalPool(RewardWorker, (from_dict(RewardsConfig, JPEG_AND_CLIP),), num_workers=2)
    images = random_images(4, 32, 32)
    outs = pool.map("score", [(images[i : i + 1], [f"p{i}"]) for i in range(4)])
    ref = RewardWorker(from_dict(RewardsConfig, {**JPEG_AND_CLIP, "rewards": JPEG_AND_CLIP["rewards"][1:]}))
    for i, out in enumerate(outs):
        torch.testing.assert_close(out.components["clip"], ref.score(images[i : i + 1], [f"p{i}"]).scores)
    assert pool.call_all("names") == [["jpeg", "clip"], ["jpeg", "clip"]]
    pool.shutdown()


@pytest.mark.ray
def test_ray_actor_gives_the_same_scores_as_in_process(ray_session):
    config = from_dict(RewardsConfig, JPEG_AND_CLIP)
    images, prompts = random_images(3, 48, 48), ["a cat", "a dog", "a red cube"]
    local = make_pool(RewardWorker, (config,), PoolConfig(kind="local")).map("score", [(images, prompts)])[0]
    pool = make_pool(RewardWorker, (config,), PoolConfig(kind="ray", num_workers=1, num_cpus_per_worker=1))
    assert isinstance(pool, RayPool)
    remote = pool.map("score", [(images, prompts)])[0]
    torch.testing.assert_close(remote.scores, local.scores)
    for name, value in local.components.items():
        torch.testing.assert_close(remote.components[name], value)
    assert pool.call_all("names") == [["jpeg", "clip"]]
    pool.shutdown()


class Echo:
    def __init__(self, offset):
        self.offset = offset

    def add(self, x):
        return x + self.offset


@pytest.mark.ray
def test_ray_pool_spreads_calls_and_returns_them_in_order(ray_session):
    pool = RayPool(Echo, (100,), num_workers=2, num_cpus=0.5)
    assert pool.map("add", [(i,) for i in range(6)]) == [100, 101, 102, 103, 104, 105]
    assert pool.call_all("add", 1) == [101, 101]
    pool.shutdown()
