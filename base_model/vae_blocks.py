"""Building blocks of the FLUX.1 autoencoder (base_model/vae.py): resnet and attention blocks, down- and
upsampling, and the encoder / decoder stacks. Module names follow the original LDM/FLUX code so the
published `vae/checkpoint.pt` loads without renaming."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # for annotations only: base_model.vae imports this module
    from base_model.vae import VAEConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, norm2, swish, conv2, plus a residual (1x1 nin_shortcut if widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1-conv projections."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # [B, 1, h*w, C]

        out = F.scaled_dot_product_attention(heads(self.q(y)), heads(self.k(y)), heads(self.v(y)))
        out = out.transpose(2, 3).reshape(b, c, h, w)  # [B, C, h, w]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """block_1, attn_1, block_2 at the lowest resolution."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (res blocks) and an optional `downsample` or `upsample`."""

    def __init__(self, widths: list[int], groups: int, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths[:-1], widths[1:]))
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)  # the published key names it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Encoder(nn.Module):
    """images [B, 3, H, W] -> moments [B, 2*z_channels, H/8, W/8] (mean then logvar)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        g, last = config.norm_groups, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = config.ch
        for i, mult in enumerate(config.ch_mult):
            out = config.ch * mult
            widths = [width] + [out] * config.num_res_blocks
            self.down.append(Level(widths, g, Downsample(out) if i != last else None, "downsample"))
            width = out
        self.mid = MidBlock(width, g)
        self.norm_out = _group_norm(width, g)
        self.conv_out = nn.Conv2d(width, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:
            h = level(h)  # last level: [B, ch*ch_mult[-1], H/8, W/8]
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))  # [B, 2*z, H/8, W/8]


class Decoder(nn.Module):
    """latent [B, z_channels, H/8, W/8] -> images [B, 3, H, W]; `up[0]` is the highest resolution."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        g = config.norm_groups
        width = config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, g)
        levels: list[Level] = []
        for i in reversed(range(len(config.ch_mult))):  # built from the lowest resolution up
            out = config.ch * config.ch_mult[i]
            widths = [width] + [out] * (config.num_res_blocks + 1)
            levels.append(Level(widths, g, Upsample(out) if i != 0 else None, "upsample"))
            width = out
        self.up = nn.ModuleList(reversed(levels))  # indexed by level, 0 = highest resolution
        self.norm_out = _group_norm(width, g)
        self.conv_out = nn.Conv2d(width, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, ch*ch_mult[-1], H/8, W/8]
        for level in reversed(self.up):
            h = level(h)  # up[0]: [B, ch, H, W]
        return self.conv_out(swish(self.norm_out(h)))  # [B, 3, H, W]
