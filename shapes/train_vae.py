"""Train a tiny NextStep VAE (FLUX layout) on shapes images; save it in the published `vae/` layout.

Loss per batch (images x in [-1, 1]):
    z  = LN_token(mu(x)) + sigma(x) * eps            posterior sample, as `NextStepVAE.encode_latent`
    z' = z + U(0, gamma) * eps'                      NextStep-1's latent noise perturbation (sigma-VAE)
    L  = |D(z') - x|_1 + |D(z') - x|_2^2 + kl_weight * KL(N(mu, sigma) || N(0, 1))
The perturbation makes the decoder tolerate the imperfect tokens a small generator samples. Adam,
constant lr after a linear warm-up, fixed seed: the same config gives the same weights on one machine.

    python -m shapes.train_vae configs/shapes_world/world.yaml --out runs/vae_only
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from base_model.vae import (
    NextStepVAE,
    VAEConfig,
    patchify,
    perturb_latent,
    save_vae,
    to_uint8,
    token_layer_norm,
    unpatchify,
)
from core.errors import ConfigError
from core.schema import load_config


@dataclass
class VaeTrainConfig:
    """The VAE's architecture (vae/config.json fields) and how it is trained."""

    arch: VAEConfig = field(
        default_factory=lambda: VAEConfig(ch=8, ch_mult=[1, 2, 4, 8], num_res_blocks=1, norm_groups=8)
    )
    steps: int = 600
    batch_images: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    kl_weight: float = 1e-6
    noise_gamma: float = 0.3  # latent perturbation: z += U(0, gamma) * eps
    foreground_weight: float = 4.0  # extra loss weight on shape pixels
    seed: int = 0

    def validate(self, where: str = "vae") -> None:
        for name in ("steps", "batch_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.kl_weight < 0 or self.noise_gamma < 0:
            raise ConfigError(f"{where}.kl_weight / noise_gamma: must be >= 0")
        if self.arch.z_channels * self.arch.psz**2 != 64:
            raise ConfigError(f"{where}.arch: z_channels * psz^2 must be 64 (NextStep tokens), got "
                              f"{self.arch.z_channels} * {self.arch.psz}^2")  # fmt: skip


def posterior(vae: NextStepVAE, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, 3, H, W] in [-1, 1] -> (sampled model latent [B, 16, H/8, W/8], KL per element, scalar)."""
    config = vae.config
    mean, logvar = vae.encoder(x).chunk(2, dim=1)  # 2 x [B, 16, H/8, W/8]
    logvar = logvar.clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    if config.encoder_norm:  # the same per-token LayerNorm as encode_latent
        grid = (mean.shape[-2] // config.psz, mean.shape[-1] // config.psz)
        mean = unpatchify(token_layer_norm(patchify(mean, config.psz)), grid, config.z_channels, config.psz)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    z = mean if config.deterministic else mean + torch.exp(0.5 * logvar) * noise
    return (z - config.shift_factor) * config.scaling_factor, kl


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, foreground_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE per pixel, weighted 1 + foreground_weight on non-white pixels of x; mean over [B, 3, H, W].

    Shapes cover ~10% of an image: without the weight the colours are learnt last.
    """
    foreground = (x < 0.9).any(dim=1, keepdim=True).float()  # [B, 1, H, W], background is white (1.0)
    per_pixel = (recon - x).abs() + (recon - x).pow(2)  # [B, 3, H, W]
    return ((1.0 + foreground_weight * foreground) * per_pixel).mean()


def lr_at(step: int, config: VaeTrainConfig) -> float:
    """Linear warm-up to config.lr, then a cosine decay to 10% at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_vae(config: VaeTrainConfig, images: torch.Tensor, log_every: int = 50) -> tuple[NextStepVAE, list[float]]:
    """images uint8 [N, 3, H, W] -> trained VAE (eval mode) and the reconstruction loss of every step."""
    torch.manual_seed(config.seed)
    vae = NextStepVAE(config.arch)
    opt = torch.optim.Adam(vae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(config.steps):
        idx = torch.randint(len(images), (config.batch_images,), generator=gen)
        x = images[idx].float() / 127.5 - 1.0  # [B, 3, H, W]
        z, kl = posterior(vae, x, gen)
        recon = vae.decode_latent(perturb_latent(z, config.noise_gamma, gen))
        rec = reconstruction_loss(recon, x, config.foreground_weight)
        loss = rec + config.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(rec.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(
                f"vae: step {step + 1}/{config.steps} recon {recent:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True
            )
    return vae.eval(), losses


@torch.no_grad()
def reconstruct(vae: NextStepVAE, images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 reconstructions through the posterior mean (what SFT encodes)."""
    h, w = images.shape[-2:]
    tokens = vae.encode(images.float() / 127.5 - 1.0)  # [N, h*w, 64]
    return to_uint8(vae.decode(tokens, (h // 16, w // 16)))


def main(argv: list[str] | None = None) -> int:
    from shapes.world import WorldConfig, world_images

    p = argparse.ArgumentParser(description="train the shapes-world VAE only (build_world runs it too)")
    p.add_argument("config", help="world config (configs/shapes_world/world.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. vae.steps=50")
    p.add_argument("--out", required=True, help="directory for checkpoint.pt + config.json")
    args = p.parse_args(argv)
    config = load_config(WorldConfig, args.config, args.overrides)
    vae, _ = train_vae(config.vae, world_images(config.data))
    print(f"vae: saved {save_vae(vae, Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
