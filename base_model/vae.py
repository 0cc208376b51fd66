"""NextStep-1 image tokenizer: the FLUX.1 autoencoder plus 2x2 patchify and per-token LayerNorm.

images [B, 3, H, W] in [-1, 1] -> latent [B, 16, H/8, W/8] -> tokens [B, (H/16)*(W/16), 64].
Module and parameter names follow the original LDM/FLUX code (`encoder.down.0.block.0.norm1.weight`,
`decoder.up.3.upsample.conv.weight`), so the published `vae/checkpoint.pt` loads without renaming.

Departures from the official code: none in the maths. As there, the "channel-wise normalization"
(LayerNorm without affine over each 64-d token) is applied to the posterior *mean*; a posterior
sample adds exp(logvar / 2) * eps to the normalised mean (diffusers' DiagonalGaussianDistribution
order). `(z - shift_factor) * scaling_factor` is applied inside `encode_latent` / undone in `decode`
rather than by the caller.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from base_model.vae_blocks import Decoder, Encoder
from core.errors import CheckpointError, ConfigError, check_state_dict
from core.files import atomic_write
from core.schema import from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "checkpoint.pt"


@dataclass
class VAEConfig:
    """Fields of the published `vae/config.json` (plus `norm_groups`)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    deterministic: bool = False  # True: a posterior "sample" is its mean
    encoder_norm: bool = True  # per-token LayerNorm of the latent at encode time
    psz: int = 2  # latent patch size: a token is psz x psz latent pixels
    norm_groups: int = 32  # GroupNorm groups (ours; FLUX hard-codes 32)

    def validate(self, where: str = "vae config") -> None:
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"{where}.ch_mult: expected a non-empty list of positive ints, got {self.ch_mult}")
        for name in ("ch", "num_res_blocks", "z_channels", "psz", "norm_groups", "in_channels", "out_ch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be positive, got {getattr(self, name)}")
        if any((self.ch * m) % self.norm_groups for m in self.ch_mult):
            raise ConfigError(f"{where}.norm_groups: {self.norm_groups} does not divide every ch * ch_mult")
        if self.scaling_factor == 0:
            raise ConfigError(f"{where}.scaling_factor: must be non-zero")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along one side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_dim(self) -> int:
        """Width of one image token: z_channels * psz * psz (64 for NextStep-1)."""
        return self.z_channels * self.psz * self.psz

    @classmethod
    def from_json_dict(cls, d: dict, where: str = "vae config") -> VAEConfig:
        """Parse a published config.json; keys meant for other loaders (latent_channels, ...) are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return from_dict(cls, {k: v for k, v in d.items() if k in known}, where=where)

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


def vae_preset(name: str) -> VAEConfig:
    """'flux': the published sizes (83.8M parameters); 'tiny': a CPU-test model with the same layout."""
    if name == "flux":
        return VAEConfig()
    if name == "tiny":
        return VAEConfig(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)
    raise ConfigError(f"unknown VAE preset '{name}' (known: flux, tiny)")


# ---------------------------------------------------------------- pure functions


def patchify(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """latent [B, C, H', W'] -> tokens [B, (H'/p)*(W'/p), C*p*p]; token element c*p*p + py*p + px."""
    b, c, hp, wp = latent.shape
    if hp % p or wp % p:
        raise ValueError(f"latent size {hp}x{wp} is not divisible by patch size {p}")
    h, w = hp // p, wp // p
    x = latent.reshape(b, c, h, p, w, p)  # [B, C, h, py, w, px]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, py, px]
    return x.reshape(b, h * w, c * p * p)


def unpatchify(tokens: torch.Tensor, grid_hw: tuple[int, int], channels: int, p: int = 2) -> torch.Tensor:
    """tokens [B, h*w, C*p*p] -> latent [B, C, h*p, w*p]; inverse of `patchify`."""
    b, n, d = tokens.shape
    h, w = grid_hw
    if n != h * w or d != channels * p * p:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit grid {h}x{w} with {channels}x{p}x{p}")
    x = tokens.reshape(b, h, w, channels, p, p)  # [B, h, w, C, py, px]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h, py, w, px]
    return x.reshape(b, channels, h * p, w * p)


def token_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine over the last dim: x [..., D] -> [..., D], zero mean, unit variance."""
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


def perturb_latent(z: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """sigma-VAE noise for tokenizer training: z [B, ...] + U(0, gamma) (one per sample) * N(0, I)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if gamma == 0:
        return z
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)
    sigma = torch.rand(shape, generator=generator, device=z.device, dtype=z.dtype) * gamma  # [B, 1, ...]
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + sigma * noise


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W] in [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------- the tokenizer


class NextStepVAE(nn.Module):
    """FLUX.1 autoencoder with NextStep-1's token view: images <-> tokens [B, h*w, 64]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode_latent(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> model latent (z - shift) * scale [B, 16, H/8, W/8]."""
        config = self.config
        side = config.downsample_factor * config.psz
        if images.shape[-2] % side or images.shape[-1] % side:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {side}")
        mean, logvar = self.encoder(images).chunk(2, dim=1)  # 2 x [B, 16, H/8, W/8]
        if config.encoder_norm:
            grid = (mean.shape[-2] // config.psz, mean.shape[-1] // config.psz)
            tokens = token_layer_norm(patchify(mean, config.psz))  # [B, h*w, 64]
            mean = unpatchify(tokens, grid, config.z_channels, config.psz)
        z = mean
        if sample and not config.deterministic:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise
        return (z - config.shift_factor) * config.scaling_factor

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> tokens [B, (H/16)*(W/16), 64]."""
        return patchify(self.encode_latent(images, sample=sample, generator=generator), self.config.psz)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """model latent [B, 16, H/8, W/8] -> images [B, 3, H, W] in about [-1, 1]."""
        config = self.config
        return self.decoder(z / config.scaling_factor + config.shift_factor)

    def decode(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """tokens [B, h*w, 64] on an h x w grid -> images [B, 3, 16h, 16w] in about [-1, 1]."""
        config = self.config
        return self.decode_latent(unpatchify(tokens, grid_hw, config.z_channels, config.psz))


# ---------------------------------------------------------------- checkpoint I/O


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as f:  # through a file object, torch reports a full disk as an OSError
        torch.save(state, f)


def save_vae(vae: NextStepVAE, directory: str | Path) -> Path:
    """Write directory/checkpoint.pt (plain state dict) and directory/config.json, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: _save_state(state, tmp))
    text = json.dumps(vae.config.to_json_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _read_config(path: Path) -> VAEConfig:
    if not path.is_file():
        raise CheckpointError(f"VAE config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    try:
        return VAEConfig.from_json_dict(data, where=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"VAE weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def load_vae(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> NextStepVAE:
    """Read directory/config.json + directory/checkpoint.pt (published layout) into a NextStepVAE."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"VAE directory not found: {directory}")
    config = _read_config(directory / CONFIG_NAME)
    path = directory / WEIGHTS_NAME
    state = _read_state_dict(path)
    with torch.device("meta"):
        vae = NextStepVAE(config)
    check_state_dict(path, state, vae.state_dict())
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype)
