"""ZeRO-Offload run for real at world size 1 on the CPU: `learner.offload_optimizer` (fp32 master weights and
Adam state in CPU memory, stepped by DeepSpeed's CPU Adam) and `learner.offload_params` (ZeRO-3 partitions in
CPU memory) take the same steps as the learner without them and resume (to float rounding);
`gradient_checkpointing` recomputes the layers and changes no loss or gradient. DeepSpeed JIT-compiles its CPU
Adam op on first use (about 150 s on 2 cores, then cached under ~/.cache/torch_extensions): the tests that need
it skip, naming the reason, where it cannot be built."""

import pytest
import torch

from alignment.engine_config import cpu_adam_error, deepspeed_config
from alignment.learner import Learner
from alignment.learner_config import LearnerConfig
from base_model.checkpoint import build_random
from base_model.sequence import build_prompt_batch
from base_model.teacher_forcing import sft_loss
from core.errors import ConfigError

pytestmark = pytest.mark.deepspeed

# lr 1e-3 over 3 steps moves weights by up to ~3e-3; CPU Adam (SIMD) and torch's AdamW round their float32
# sums differently, measured 2.4e-7 apart after 3 steps (2 ulp at 1.0): 1e-6 is far below any wrong update
ATOL = 1e-6


@pytest.fixture(scope="module")
def cpu_adam():
    error = cpu_adam_error()  # builds the op on first use (about 150 s), then loads it from the cache
    if error is not None:
        pytest.skip(f"DeepSpeed's CPU Adam cannot be built here: {error}")


def _setup(**overrides):
    """A tiny SFT learner (weight decay on, so the weight-decay mode matters) and 2 micro batches."""
    bundle = build_random("tiny", seed=0)
    config = LearnerConfig(lr=1e-3, weight_decay=0.1, **overrides)
    learner = Learner(bundle.model.train(), config)
    g = torch.Generator().manual_seed(0)
    data = [(build_prompt_batch(bundle.tokenizer, bundle.ids, [f"caption {i}"], (64, 64), False),
             torch.randn(1, 16, 64, generator=g)) for i in range(2)]  # fmt: skip

    def loss_fn(model, mb):
        out = sft_loss(model, mb[0], bundle.ids, mb[1], generator=torch.Generator().manual_seed(1))
        return out.loss, {}

    return learner, data, loss_fn


def _run(steps: int, **overrides):
    learner, data, loss_fn = _setup(**overrides)
    metrics = [learner.step(data, loss_fn).metrics for _ in range(steps)]
    return learner, metrics


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_cpu_adam_takes_the_adamw_step_of_the_learner_config(cpu_adam):
    """DeepSpeed's CPU Adam as the engine builds it for type AdamW (adamw_mode) vs torch's AdamW, both from the
    optimizer params of deepspeed_config, against a hand-computed AdamW: p0 = 1, grads +0.5 then -0.5,
    lr = wd = 0.1, betas (0.9, 0.999); eps 0.1 (not the config's 1e-8) so its place shows.
    Step 1: m^ = 0.5, v^ = 0.25; p1 = 1 * (1 - 0.1 * 0.1) - 0.1 * 0.5 / (sqrt(0.25) + 0.1) = 0.99 - 0.083333.
    Step 2: m = 0.9 * 0.05 - 0.05 = -0.005, m^ = -0.005 / 0.19; v^ = (0.999 * 0.00025 + 0.00025) / 0.001999
    = 0.25; p2 = p1 * 0.99 + 0.1 * (0.005 / 0.19) / 0.6 = 0.8976 + 0.0043860.
    Adam with L2 decay would give p1 = 0.9 - ..., eps under the root 0.5 / sqrt(0.35), no bias correction a
    step of 0.1 * 0.05 / (0.0158 + 0.1): each is off by more than 1e-3."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = deepspeed_config(LearnerConfig(lr=0.1, weight_decay=0.1, zero_stage=2, offload_optimizer=True))
    params = {**params["optimizer"]["params"], "eps": 0.1}
    assert "torch_adam" not in params  # offloaded: the engine builds DeepSpeed's CPU Adam from these
    expected = [0.99 - 0.1 * 0.5 / 0.6, (0.99 - 0.1 * 0.5 / 0.6) * 0.99 + 0.1 * (0.005 / 0.19) / 0.6]
    assert expected == pytest.approx([0.9066667, 0.9019860], abs=1e-7)
    for make in (
        lambda p: DeepSpeedCPUAdam([p], adamw_mode=True, **params),
        lambda p: torch.optim.AdamW([p], **params),
    ):
        p = torch.nn.Parameter(torch.ones(37))  # 37: CPU Adam's SIMD lanes and its scalar tail both run
        opt = make(p)
        for grad, want in zip((0.5, -0.5), expected):
            p.grad = torch.full_like(p, grad)
            opt.step()
            assert torch.allclose(p.detach(), torch.full_like(p, want), atol=1e-6), type(opt).__name__


@pytest.mark.parametrize(
    "offload",
    [
        pytest.param(dict(zero_stage=2, offload_optimizer=True), id="z2-optimizer"),
        pytest.param(dict(zero_stage=3, offload_optimizer=True), id="z3-optimizer", marks=pytest.mark.slow),
        pytest.param(dict(zero_stage=3, offload_params=True), id="z3-params", marks=pytest.mark.slow),
        pytest.param(
            dict(zero_stage=3, offload_optimizer=True, offload_params=True), id="z3-both", marks=pytest.mark.slow
        ),
    ],
)
def test_offloaded_steps_equal_the_steps_without_offload(cpu_adam, offload):
    plain, plain_metrics = _run(3, zero_stage=offload["zero_stage"])
    learner, metrics = _run(3, **offload)
    if offload.get("offload_optimizer"):
        assert type(learner.engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
    for got, want in zip(metrics, plain_metrics):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-6)
        assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-5)
    start = build_random("tiny", seed=0).model.state_dict()
    a, b = plain.policy_weights(), learner.policy_weights()
    assert _max_diff(a, start) > 1e-3  # the 3 steps moved the weights
    assert _max_diff(a, b) < ATOL


@pytest.mark.slow
def test_the_large_configs_learner_zero3_bf16_offload_checkpointing_steps_as_without_offload(cpu_adam):
    """configs/grpo/nextstep_large.yaml's learner (ZeRO-3, bf16, offload_optimizer, gradient_checkpointing) vs
    the same without offload, 2 steps: same losses and gradient norms, published bf16 weights within one bf16
    step. Not 3: the fp32 masters differ by float rounding (1e-7), which can flip one bf16 rounding; the next
    gradient then differs in that element's neighbourhood and Adam, normalising, turns a tiny gradient's
    difference into one of order lr (measured: 2.4e-4 on 0.004 moved, after 3 steps)."""
    keys = dict(zero_stage=3, bf16=True, gradient_checkpointing=True)
    plain, plain_metrics = _run(2, **keys)
    learner, metrics = _run(2, offload_optimizer=True, **keys)
    assert type(learner.engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
    for got, want in zip(metrics, plain_metrics):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-6)
        assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-6)
    a, b = plain.policy_weights(), learner.policy_weights()
    assert _max_diff(a, build_random("tiny", seed=0).model.state_dict()) > 1e-3
    # one bf16 step (8 significant bits) apart, or the masters' rounding apart where a weight crosses 0
    assert all(torch.allclose(a[k], b[k], rtol=2**-7, atol=ATOL) for k in a)


def test_without_cpu_adam_the_offloaded_optimizer_is_torchs_adamw_on_the_cpu(monkeypatch, capsys):
    """Where the op cannot be built the learner says so in one line and DeepSpeed steps the offloaded fp32
    partitions with torch's AdamW (zero_force_ds_cpu_optimizer off): the very update of the plain learner."""
    import alignment.engine_config as engine_config

    monkeypatch.setattr(engine_config, "cpu_adam_error", lambda: "RuntimeError: no C++ compiler")
    plain, _ = _run(2, zero_stage=2)
    learner, _ = _run(2, zero_stage=2, offload_optimizer=True)
    assert "CPU Adam cannot be built here (RuntimeError: no C++ compiler)" in capsys.readouterr().out
    assert type(learner.engine.basic_optimizer) is torch.optim.AdamW
    assert learner.engine.zero_offload_optimizer() is not None  # still offloaded
    a, b = plain.policy_weights(), learner.policy_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(zero_stage=0, offload_optimizer=True), "learner.offload_optimizer: needs zero_stage 1, 2 or 3 (got 0)"),
        (dict(zero_stage=2, offload_params=True), "learner.offload_params: needs zero_stage 3 (got 2)"),
    ],
)
def test_impossible_offload_is_one_config_error_before_deepspeed_starts(keys, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Learner(build_random("tiny", seed=0).model, LearnerConfig(**keys))


@pytest.mark.slow
@pytest.mark.parametrize(
    "offload",
    [dict(zero_stage=2, offload_optimizer=True), dict(zero_stage=3, offload_optimizer=True, offload_params=True)],
    ids=["z2-optimizer", "z3-both"],
)
def test_resume_with_offload_restores_the_cpu_adam_state(cpu_adam, tmp_path, offload):
    """4 steps straight == 2 steps, save, a fresh learner loads, 2 more steps; after the load the CPU Adam
    moments and step are the saved ones (a fresh optimizer's first step would be ~lr * sign(grad): far off).
    Equal to float rounding, not bit for bit (torch's AdamW resumes bit-exactly, test_learner.py): CPU Adam's
    C++ object keeps beta^step as a running float product, and a fresh one starts it from pow(beta, step)
    (measured 1.2e-7 apart, 1 ulp)."""
    straight, _ = _run(4, **offload)
    first, _ = _run(2, **offload)
    first.save_state(tmp_path)
    resumed, data, loss_fn = _setup(**offload)
    resumed.load_state(tmp_path)
    saved, loaded = first.engine.basic_optimizer.state, resumed.engine.basic_optimizer.state
    assert len(loaded) == len(saved) > 0
    for s, l in zip(saved.values(), loaded.values()):
        assert l["step"] == s["step"] == 2
        assert torch.equal(l["exp_avg"], s["exp_avg"]) and torch.equal(l["exp_avg_sq"], s["exp_avg_sq"])
    for _ in range(2):
        resumed.step(data, loss_fn)
    assert _max_diff(straight.policy_weights(), resumed.policy_weights()) < ATOL


@pytest.mark.parametrize("zero_stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_gradient_checkpointing_recomputes_the_layers_and_changes_no_loss_or_gradient(zero_stage):
    """learner.gradient_checkpointing: each decoder layer runs again in the backward (its MLP starts twice per
    micro batch, once without), and the loss, gradient norm and updated weights are those without it."""
    results = {}
    for checkpointing in (False, True):
        learner, data, loss_fn = _setup(zero_stage=zero_stage, gradient_checkpointing=checkpointing)
        calls = []
        # a pre-hook: the recompute stops (torch's early stop) once the tensors the backward needs exist,
        # before the MLP returns, so its forward hook would not see the second call
        learner.model.layers[0].mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        metrics = learner.step(data, loss_fn).metrics
        results[checkpointing] = (len(calls), metrics, learner.policy_weights())
    (plain_calls, plain, plain_w), (calls, ckpt, ckpt_w) = results[False], results[True]
    assert (plain_calls, calls) == (2, 4)  # 2 micro batches: forward only, forward + recompute
    assert ckpt["train/loss"] == plain["train/loss"]
    assert ckpt["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-6)
    assert all(torch.allclose(plain_w[k], ckpt_w[k], atol=ATOL) for k in plain_w)
