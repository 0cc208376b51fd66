"""PickScore (Kirstain et al. 2023, arXiv:2305.01569): CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = logit_scale.exp() * cosine(image, text) (about 20-23 on generated images); Flow-GRPO trains on
score / 26, which `divisor: 26` gives. Model: transformers `CLIPModel` from a local copy of hub
yuvalkirstain/PickScore_v1; processor (tokenizer + image preprocessing: shortest side 224 bicubic,
centre crop, OpenAI mean/std) from a local copy of hub laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as the
PickScore README loads them. `write_clip_processor_dir` can produce an equivalent processor directory
from the OpenAI BPE vocabulary that open-clip-torch ships.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPTokenizerFast

from core.errors import CheckpointError, ConfigError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import finish_model, load_hf_pretrained, seeded_init, to_pil

MODEL_SOURCE = "hub yuvalkirstain/PickScore_v1 (config.json + weights)"
PROCESSOR_SOURCE = "hub laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer files + preprocessor_config.json)"
# CLIP ViT-H/14 as in PickScore_v1/config.json (text 24 x 1024, vision 32 x 1280, projection 1024).
FULL_CLIP = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024,
)  # fmt: skip
TINY_CLIP = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                       patch_size=32, image_size=224, hidden_act="gelu"),
    projection_dim=32,
)  # fmt: skip


@dataclass
class Config:
    """Params of `type: pickscore`."""

    model_dir: str | None = None  # local PickScore_v1
    processor_dir: str | None = None  # local CLIP-ViT-H-14 processor files (default: model_dir)
    size: Literal["full", "tiny"] = "full"  # for init: random only; a checkpoint brings its own config.json
    init: Literal["checkpoint", "random"] = "checkpoint"
    divisor: float = 1.0  # Flow-GRPO: 26

    def validate(self, where: str) -> None:
        if self.processor_dir is None and self.model_dir is None:
            raise ConfigError(f"{where}.processor_dir: required (tokenizer + preprocessor files, {PROCESSOR_SOURCE})")
        if self.init == "checkpoint" and self.model_dir is None:
            raise ConfigError(f"{where}.model_dir: required with init: checkpoint ({MODEL_SOURCE})")
        if self.divisor <= 0:
            raise ConfigError(f"{where}.divisor: must be > 0")

    def files(self) -> list[RequiredFile]:
        proc = self.processor_dir or self.model_dir
        files = [
            RequiredFile("processor_dir", f"{proc}/tokenizer_config.json", PROCESSOR_SOURCE, "CLIP tokenizer files"),
            RequiredFile("processor_dir", f"{proc}/preprocessor_config.json", PROCESSOR_SOURCE, "CLIP image processor"),
        ]  # fmt: skip
        if self.init == "checkpoint":
            files.append(RequiredFile("model_dir", f"{self.model_dir}/config.json", MODEL_SOURCE, "CLIPModel config"))
        return files


def load_processor(directory: str) -> CLIPProcessor:
    """CLIPProcessor from local files, as PickScore's `AutoProcessor` builds it: the fast (Rust) CLIP
    tokenizer, which only lower-cases and normalises whitespace (the slow one runs ftfy: curly quotes,
    ligatures and `&amp;` would tokenise differently), and the PIL image processor."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"CLIP processor directory not found: {directory} (published: {PROCESSOR_SOURCE})")
    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(directory, local_files_only=True)
        image_processor = CLIPImageProcessor.from_pretrained(directory, local_files_only=True)
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"CLIP processor at {directory}: cannot load ({PROCESSOR_SOURCE}): {e}") from None
    return processor


def write_clip_processor_dir(directory: str | Path) -> Path:
    """Write a CLIP tokenizer (49408 tokens) + default image processor built from open_clip's OpenAI BPE.

    The vocabulary is the OpenAI CLIP one: 256 byte symbols, the same with '</w>', the first 48894
    merges, then <|startoftext|> and <|endoftext|>; laion/CLIP-ViT-H-14 uses the same tokenizer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_model(config: Config) -> CLIPModel:
    """CLIPModel from model_dir (init: checkpoint), or seeded random weights of the `size` architecture."""
    if config.init == "checkpoint":
        return load_hf_pretrained(CLIPModel, config.model_dir, "PickScore model", MODEL_SOURCE)
    with seeded_init():
        return CLIPModel(CLIPConfig(**(FULL_CLIP if config.size == "full" else TINY_CLIP)))


class PickScore:
    """PickScore of each (image, prompt), divided by `divisor`."""

    name = "pickscore"

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, divisor: float):
        self.model, self.processor, self.divisor = model, processor, divisor
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        pixels = self.processor(images=to_pil(images), return_tensors="pt").pixel_values.to(self.device, self.dtype)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = torch.nn.functional.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)
        text_emb = self.model.get_text_features(**text.to(self.device)).float()
        cos = (image_emb * torch.nn.functional.normalize(text_emb, dim=-1)).sum(-1).cpu()  # [B]
        raw = self.model.logit_scale.float().exp().cpu() * cos  # [B]
        return RewardOutput(scores=raw / self.divisor, components={"raw": raw, "cosine": cos})


def build(config: Config, device: torch.device, dtype: torch.dtype) -> PickScore:
    """The PickScore reward on `device` in `dtype`; the tokenizer must match the model vocabulary."""
    processor_dir = config.processor_dir or config.model_dir
    processor = load_processor(processor_dir)
    model = build_model(config)
    if len(processor.tokenizer) != model.config.text_config.vocab_size:  # a wrong tokenizer fails loudly
        raise CheckpointError(
            f"CLIP tokenizer at {processor_dir} has {len(processor.tokenizer)} tokens, "
            f"the model expects {model.config.text_config.vocab_size}"
        )
    return PickScore(finish_model(model, device, dtype), processor, config.divisor)
