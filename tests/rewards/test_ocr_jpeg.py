"""OCR (real PP-OCRv4 models from the wheel) and JPEG compressibility."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from core.errors import UserError
from rewards import jpeg, ocr
from tests.rewards.helpers import random_images

CPU = torch.device("cpu")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def render(text: str, size: tuple[int, int] = (512, 256)) -> torch.Tensor:
    """Black text on white, uint8 [3, H, W]."""
    font = ImageFont.truetype(str(FONT), 44) if FONT.is_file() else ImageFont.load_default(size=44)
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((24, size[1] // 2 - 30), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def test_edit_distance_and_flow_grpo_formula():
    assert ocr.edit_distance("kitten", "sitting") == 3 and ocr.edit_distance("", "abc") == 3
    assert ocr.quoted_target('A sign saying "Hello World" at dusk') == "Hello World"
    assert ocr.ocr_reward("Helo World", "hello world") == pytest.approx(1 - 1 / 10)  # 10 chars without space
    assert ocr.ocr_reward("OPEN: hello world!", "Hello World") == 1.0  # contained -> distance 0
    assert ocr.ocr_reward("", "hello") == 0.0  # nothing recognised
    assert ocr.ocr_reward("a very long unrelated caption", "hi") == 0.0  # distance capped at len(target)
    with pytest.raises(UserError, match="no text in double quotes"):
        ocr.quoted_target("a sign without quotes")


def test_rendered_text_scores_high_wrong_or_missing_text_near_zero():
    reward = ocr.build(ocr.Config(num_threads=2), CPU, torch.float32)
    images = torch.stack([render("Spring Collection"), render("Spring Collection"), torch.full((3, 256, 512), 255,
                          dtype=torch.uint8)])  # fmt: skip
    prompts = ['a runway with a backdrop saying "Spring Collection"', 'an engraved ring reading "Forever Yours"',
               'a poster that says "Grand Opening"']  # fmt: skip
    scores = reward(images, prompts).scores
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] > 0.8, scores
    assert scores[1] < 0.2 and scores[2] == 0.0, scores


def test_noisier_images_are_less_compressible():
    flat = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    mild = (flat.float() + 8 * torch.randn(1, 3, 64, 64)).clamp(0, 255).to(torch.uint8)
    noise = random_images(1)
    images = torch.cat([flat, mild, noise])
    comp = jpeg.build(jpeg.Config("compressibility"), CPU, torch.float32)(images, ["", "", ""])
    incomp = jpeg.build(jpeg.Config("incompressibility"), CPU, torch.float32)(images, ["", "", ""])
    sizes = comp.components["size_kb"]
    assert sizes[0] < sizes[1] < sizes[2]
    torch.testing.assert_close(comp.scores, -sizes)
    torch.testing.assert_close(incomp.scores, sizes)
    pil = Image.fromarray(noise[0].permute(1, 2, 0).numpy())
    assert sizes[2].item() == pytest.approx(jpeg.jpeg_size_kb(pil, 95))  # bytes / 1000 at quality 95
