"""The flow-matching head: SimpleMLPAdaLN(64 -> width, cond hidden, N res blocks) predicting velocity.

Parameter names follow the published checkpoint (`image_head.net.*`). Time runs from noise (t=0)
to data (t=1); the time embedding takes raw t in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of raw t: [N] -> [N, dim], cos half first, freqs exp(-ln(max_period) * i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [N, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [N] -> [N, width]
        emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class ResBlock(nn.Module):
    """x + gate * MLP(LayerNorm(x) * (1 + scale) + shift); shift/scale/gate from the condition y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        x = F.layer_norm(x, (self.width,), eps=1e-6)  # no affine
        return self.linear(modulate(x, shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, token_dim: int, cond_dim: int, width: int, num_blocks: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(num_blocks)])
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, 64], t [N] in [0,1], c [N, cond] -> velocity [N, 64]."""
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowHead(nn.Module):
    """Wrapper whose `net` attribute reproduces the published key prefix `image_head.net.`."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, num_blocks: int):
        super().__init__()
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, width, num_blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)
