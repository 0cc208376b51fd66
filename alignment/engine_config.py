"""The DeepSpeed config of the learner's engines, from `LearnerConfig`: ZeRO stage, bf16, clipping, AdamW
and ZeRO-Offload (with DeepSpeed's CPU Adam where its op builds here, torch's AdamW on the CPU otherwise),
and the frozen reference's inference engine. Split from alignment/learner.py, which builds the engines.
"""

from __future__ import annotations

from typing import Any

from alignment.learner_config import LearnerConfig

ADAM_EPS = 1e-8  # torch's AdamW and DeepSpeed's CPU Adam both default to it: stated, so the two cannot drift


def cpu_adam_error() -> str | None:
    """Why DeepSpeed's CPU Adam op cannot be loaded here, in one line, or None when it loads. DeepSpeed compiles
    it on first use (about 150 s on 2 cores, then cached under ~/.cache/torch_extensions); without a C++
    compiler, or on CUDA without the toolkit's headers, it cannot."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as error:  # the builder passes on whatever the compiler, linker or loader raised
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}"
    return None


def deepspeed_config(config: LearnerConfig, cpu_adam: bool = True) -> dict:
    """The DeepSpeed config of a training engine. Optional ZeRO-Offload: `offload_optimizer` keeps the fp32
    master weights and Adam state in CPU memory and steps them there; `offload_params` (ZeRO-3) keeps the
    parameter partitions there too, fetched to the device per layer. An impossible combination (offload
    without ZeRO, parameter offload without ZeRO-3) is one ConfigError line.

    Every path takes the same AdamW step (decoupled weight decay, bias correction, eps added after the square
    root; tests/alignment/test_offload.py): torch's AdamW where the optimizer is not offloaded, DeepSpeed's
    CPU Adam (adamw_mode) where it is, or, with `cpu_adam` False (its op cannot be built, `cpu_adam_error`),
    torch's AdamW on the offloaded CPU partitions, which DeepSpeed allows once zero_force_ds_cpu_optimizer is
    off (same update, slower step)."""
    config.validate()
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    adam = {"lr": config.lr, "betas": list(config.adam_betas), "eps": ADAM_EPS, "weight_decay": config.weight_decay}
    if not (config.offload_optimizer and cpu_adam):
        adam["torch_adam"] = True  # else DeepSpeed builds its CPU Adam, in AdamW mode for type AdamW
    ds = {
        "train_micro_batch_size_per_gpu": 1,  # our micro batches are opaque objects; we scale losses
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": config.bf16},
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 10**9,
    }
    if config.offload_optimizer and not cpu_adam:
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def offload_config(config: LearnerConfig) -> dict:
    """`deepspeed_config` for a learner about to be built: with `offload_optimizer`, CPU Adam when its op loads
    here, else (one printed line saying why) torch's AdamW on the CPU."""
    cpu_adam = True
    if config.offload_optimizer:
        error = cpu_adam_error()
        if error is not None:
            print(f"learner.offload_optimizer: DeepSpeed's CPU Adam cannot be built here ({error}); stepping the "
                  "offloaded optimizer with torch's AdamW on the CPU instead (same update, slower)")  # fmt: skip
            cpu_adam = False
    return deepspeed_config(config, cpu_adam)


def reference_config(config: LearnerConfig) -> dict:
    """The DeepSpeed config of the frozen reference under ZeRO-3: an inference engine, partitioned alike."""
    zero: dict[str, Any] = {"stage": 3}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": config.bf16}}
