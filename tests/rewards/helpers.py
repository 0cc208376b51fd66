"""Test helpers: images, and parameter counts derived layer by layer from the published architectures."""

import torch


def random_images(batch: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 [B, 3, H, W] noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def layer_norm(d: int) -> int:
    return 2 * d


def vit_block(d: int, mlp: int) -> int:
    """Pre-norm transformer block: 2 LayerNorms, q/k/v + output projections (with biases), 2-layer MLP."""
    return 2 * layer_norm(d) + linear(d, 3 * d) + linear(d, d) + linear(d, mlp) + linear(mlp, d)


def image_tower(width: int, layers: int, patch: int, *, conv_bias: bool, num_norms: int, proj: int) -> int:
    """ViT on 224 px: patch conv, [CLS], (224/patch)^2 + 1 positions, blocks (MLP 4x), LayerNorms, projection."""
    tokens = (224 // patch) ** 2 + 1
    conv = 3 * patch * patch * width + (width if conv_bias else 0)
    return conv + width + tokens * width + layers * vit_block(width, 4 * width) + num_norms * layer_norm(width) + proj


def rating_mlp(d: int) -> int:
    """d-1024-128-64-16-1 head of ImageReward and of the LAION aesthetic predictor."""
    return linear(d, 1024) + linear(1024, 128) + linear(128, 64) + linear(64, 16) + linear(16, 1)


def clip_vit_h14() -> int:
    """OpenCLIP ViT-H-14 (= PickScore's CLIP): image tower 32 x 1280, patch 14, bias-free conv, ln_pre and
    ln_post, projection 1280 -> 1024; text tower 24 x 1024 over 49408 tokens and 77 positions, final
    LayerNorm, projection 1024 -> 1024; one logit scale."""
    image = image_tower(1280, 32, 14, conv_bias=False, num_norms=2, proj=1280 * 1024)
    text = 49408 * 1024 + 77 * 1024 + 24 * vit_block(1024, 4096) + layer_norm(1024) + 1024 * 1024
    return image + text + 1


def clip_vit_l14_image() -> int:
    """OpenAI CLIP ViT-L/14 image tower: 24 x 1024, patch 14, bias-free conv, 2 LayerNorms, 1024 -> 768."""
    return image_tower(1024, 24, 14, conv_bias=False, num_norms=2, proj=1024 * 768)
