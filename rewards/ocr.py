"""OCR reward for text rendering (Flow-GRPO, Liu et al. 2025, arXiv:2505.05470).

target = the first double-quoted part of the prompt; recognised = every text line PP-OCRv4 reads in
the image, joined; both normalised (spaces removed, lower-cased). As Flow-GRPO's scorer:
    d = 0 if target is a substring of recognised, else min(edit_distance(recognised, target), len(target))
    reward = 1 - d / len(target)
so an image where nothing is recognised scores 0. The OCR engine is rapidocr-onnxruntime, whose ONNX
detection/recognition models ship inside the wheel (Flow-GRPO uses PaddleOCR with the same PP-OCR
family); like Flow-GRPO we skip the text-angle classifier.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rapidocr_onnxruntime import RapidOCR

from core.errors import UserError
from rewards.base import RequiredFile, RewardOutput, check_inputs

SOURCE = "PyPI rapidocr-onnxruntime (models inside the wheel)"


@dataclass
class Config:
    """Params of `type: ocr`."""

    text_score: float = 0.5  # rapidocr drops lines recognised with lower confidence (its default)
    use_angle_cls: bool = False  # Flow-GRPO: ocr(img, cls=False)
    num_threads: int = -1  # onnxruntime intra-op threads (-1: onnxruntime's default, all cores)

    def files(self) -> list[RequiredFile]:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        models = Path(spec.origin).parent / "models" if spec and spec.origin else Path("rapidocr_onnxruntime/models")
        names = ["ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"]
        names += ["ch_ppocr_mobile_v2.0_cls_infer.onnx"] if self.use_angle_cls else []
        return [RequiredFile("", str(models / n), SOURCE, "PP-OCR ONNX model") for n in names]


def quoted_target(prompt: str) -> str:
    """The text between the first pair of double quotes (Flow-GRPO: prompt.split('"')[1])."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise UserError(f'ocr reward: prompt has no text in double quotes: "{prompt[:80]}"')
    return parts[1]


def normalise_text(text: str) -> str:
    """Remove spaces and lower-case, as Flow-GRPO compares texts."""
    return text.replace(" ", "").lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward(recognised: str, target: str) -> float:
    """1 - min(edit distance, len(target)) / len(target) on normalised text; 1 if target is contained."""
    recognised, target = normalise_text(recognised), normalise_text(target)
    if not target:
        raise UserError("ocr reward: the quoted target text is empty")
    dist = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1.0 - dist / len(target)


class OcrReward:
    """How well each image renders the quoted text of its prompt, in [0, 1]."""

    name = "ocr"

    def __init__(self, engine: RapidOCR, text_score: float, use_angle_cls: bool):
        self.engine, self.text_score, self.use_angle_cls = engine, text_score, use_angle_cls

    def read(self, image: torch.Tensor) -> str:
        """uint8 [3, H, W] RGB -> all recognised lines joined."""
        bgr = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()[..., ::-1])  # rapidocr takes BGR arrays
        lines, _ = self.engine(bgr, use_cls=self.use_angle_cls, text_score=self.text_score)
        return "".join(line[1] for line in lines or [])

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        targets = [quoted_target(p) for p in prompts]
        scores = [ocr_reward(self.read(im), t) for im, t in zip(images, targets)]
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32))


def build(config: Config, device: torch.device, dtype: torch.dtype) -> OcrReward:
    """The OCR reward on the ONNX CPU runtime (device and dtype unused)."""
    engine = RapidOCR(intra_op_num_threads=config.num_threads, inter_op_num_threads=1)
    return OcrReward(engine, config.text_score, config.use_angle_cls)
