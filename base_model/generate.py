"""Text -> images: prompt batches, the KV-cache sampler, VAE decoding, in chunks of a fixed size."""

from __future__ import annotations

import math

import numpy as np
import torch

from base_model.checkpoint import NextStepBundle
from base_model.cuda_graphs import sample_tokens_static, use_cuda_graphs
from base_model.sampler import SampleResult, SamplingConfig, sample_tokens
from base_model.sequence import PromptBatch, build_prompt_batch, build_self_cot_batch
from base_model.text import TextSample
from base_model.vae import to_uint8


@torch.no_grad()
def decode_tokens(bundle: NextStepBundle, tokens: torch.Tensor, image_size: int) -> torch.Tensor:
    """tokens [B, T, 64] -> uint8 images [B, 3, S, S] on CPU."""
    grid = (image_size // 16, image_size // 16)
    vae = bundle.vae
    dtype = next(vae.parameters()).dtype
    images = vae.decode(tokens.to(device=next(vae.parameters()).device, dtype=dtype), grid)
    return to_uint8(images.float()).cpu()


def sample_prompts(
    bundle: NextStepBundle,
    prompts: list[str],
    seeds: list[int] | torch.Tensor,
    sampling: SamplingConfig,
    record_chains: bool = False,
    progress: bool = False,
    prefix_tokens: torch.Tensor | None = None,
) -> SampleResult:
    """Tokens (and optionally chains / log-probs) for prompts[i] with seeds[i]; prefix_tokens [B, m, 64]:
    continue from these first m tokens (see `sample_tokens`). On CUDA (sampling.cuda_graphs) the
    static-shape loop replayed from CUDA graphs computes them (`sample_tokens_static`)."""
    batch = sampler_batch(bundle, prompts, sampling)
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    # the static loop (CUDA graphs and/or torch.compile) covers image-only sampling; Self-CoT runs the reference loop
    if not sampling.self_cot and (sampling.compile or use_cuda_graphs(sampling.cuda_graphs, bundle.model.device)):
        return sample_tokens_static(bundle.model, batch, seeds, sampling, record_chains=record_chains,
                                    progress=progress, prefix_tokens=prefix_tokens)  # fmt: skip
    return sample_tokens(
        bundle.model, batch, seeds, sampling, record_chains=record_chains, progress=progress,
        prefix_tokens=prefix_tokens,
    )  # fmt: skip


def sampler_batch(bundle: NextStepBundle, prompts: list[str], sampling: SamplingConfig) -> PromptBatch:
    """The prompt rows the sampler starts from: captions + image prefix, or (sampling.self_cot) the
    CoT-wrapped captions whose reasoning the sampler writes before the image prefix."""
    size = (sampling.image_size, sampling.image_size)
    if sampling.self_cot:
        return build_self_cot_batch(bundle.tokenizer, bundle.ids, prompts, size, sampling.uses_guidance, sampling.cot,
                                    negative_prompt=sampling.negative_prompt,
                                    max_prompt_tokens=sampling.max_prompt_tokens)  # fmt: skip
    return build_prompt_batch(
        bundle.tokenizer, bundle.ids, prompts, size, with_uncond=sampling.uses_guidance,
        negative_prompt=sampling.negative_prompt, max_prompt_tokens=sampling.max_prompt_tokens,
    )  # fmt: skip


def decode_text(bundle: NextStepBundle, text: TextSample | None) -> list[str] | None:
    """Each sample's reasoning as a string (None without Self-CoT)."""
    if text is None:
        return None
    return bundle.tokenizer.batch_decode(text.rows(), skip_special_tokens=False)


def generate_images(
    bundle: NextStepBundle,
    prompts: list[str],
    seeds: list[int],
    sampling: SamplingConfig,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 [N, 3, S, S] for prompts[i] with seeds[i], sampled `batch_size` at a time."""
    return generate_with_text(bundle, prompts, seeds, sampling, batch_size, progress)[0]


def generate_with_text(
    bundle: NextStepBundle,
    prompts: list[str],
    seeds: list[int],
    sampling: SamplingConfig,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, TextSample | None]:
    """`generate_images`, and (sampling.self_cot) the reasoning each image was drawn after, on the CPU."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images, texts = [], []
    for start in range(0, len(prompts), batch_size):
        res = sample_prompts(
            bundle, prompts[start : start + batch_size], seeds[start : start + batch_size], sampling,
            progress=progress,
        )  # fmt: skip
        images.append(decode_tokens(bundle, res.tokens, sampling.image_size))
        texts.append(res.text)
    text = TextSample.concat([t.to("cpu") for t in texts]) if sampling.self_cot else None
    return torch.cat(images, dim=0), text


def make_grid(images: torch.Tensor, ncols: int) -> np.ndarray:
    """uint8 [N, 3, H, W] -> HxWx3 numpy grid with `ncols` columns."""
    n, _, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, c = divmod(i, ncols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img.transpose(1, 2, 0)
    return grid
