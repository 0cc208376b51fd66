"""LoRA through peft: adapters injected in place into a NextStep model (it keeps its class and methods).

The learner (alignment/learner.py) trains only the adapters, merges them into `policy_weights()` and
disables them for its reference pass; the ranks, alpha and targets come from `LoraConfig`.
"""

from __future__ import annotations

import torch

from alignment.learner_config import LoraConfig
from core.errors import ConfigError


def apply_lora(model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """Inject LoRA adapters in place (the model keeps its class and methods); only adapters stay trainable."""
    import peft

    lora = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.target_modules)
    )
    try:
        model = peft.inject_adapter_in_model(lora, model)
    except ValueError as e:  # peft: no module matched target_modules
        raise ConfigError(f"learner.lora.target_modules: {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every module peft replaced (empty without LoRA)."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
