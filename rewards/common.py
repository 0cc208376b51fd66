"""Pieces shared by the learned rewards: image preprocessing as the published pipelines do it (PIL
bicubic, or HPSv2's float-tensor letterbox), the rating MLP head of ImageReward and the LAION aesthetic
predictor, and strict loading of published checkpoint files (a missing file or key is a CheckpointError
naming path and source).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.errors import CheckpointError, check_state_dict

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_INIT_SEED = 0  # `init: random` weights are drawn from this seed, so every worker builds the same model


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 [B, 3, H, W] -> B RGB PIL images."""
    arrays = images.detach().to("cpu").permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arrays]


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size, BICUBIC) then CenterCrop(size): shorter side -> size, centre square."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def letterbox(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPSv2's ToTensor then ResizeMaxSize: uint8 [B, 3, H, W] -> float [B, 3, S, S] in [0, 1].

    As upstream: pixels become floats first, the longer side is resized to `size` on the float tensor
    (bicubic, antialias, no rounding or clamping, so overshoots stay), then `fill` pads the rest, centred.
    Upstream skips the padding too when the longer side is already `size`, leaving a non-square
    image; we pad then as well, so every output is size x size.
    """
    x = images.float() / 255.0  # [B, 3, H, W]
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return F.pad(x, (left, size - new_w - left, top, size - new_h - top), value=fill)


def pil_to_unit(images: Iterable[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float32 [B, 3, S, S] in [0, 1] (torchvision's ToTensor)."""
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])  # [B, S, S, 3]
    return x.permute(0, 3, 1, 2) / 255.0


def standardize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """float [B, 3, S, S] in [0, 1] -> (x - mean) / std per channel."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def normalize(images: Iterable[Image.Image], mean: tuple, std: tuple) -> torch.Tensor:
    """PIL images of one size -> float32 [B, 3, S, S], (x/255 - mean) / std."""
    return standardize(pil_to_unit(images), mean, std)


class RatingMLP(nn.Module):
    """The published head 768-1024-128-64-16-1 with dropouts and no activations (keys layers.{0,2,4,6,7})."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # [B, D] -> [B, 1]


def require_file(path: str | Path | None, what: str, source: str) -> Path:
    """`path` as a Path if it is a file, else a CheckpointError naming what it is and where it comes from."""
    if path is None or not Path(path).is_file():
        raise CheckpointError(f"{what} not found at {path} (published: {source}); nothing is downloaded")
    return Path(path)


def read_torch_file(path: Path, what: str) -> Any:
    """torch.load of `path` on the CPU with weights_only (no code from the file runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's to fix, whatever the reason
        first = (str(e) or type(e).__name__).splitlines()[0]  # torch's refusal of a pickle spans many lines
        raise CheckpointError(f"{what} at {path} is not a readable torch file: {first}") from None


def as_state_dict(obj: Any, where: str, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """`obj` (or `obj[nested_key]`, e.g. a training checkpoint's 'state_dict') checked to be name -> tensor."""
    if nested_key is not None:
        if not isinstance(obj, dict) or nested_key not in obj:
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{where}: expected a dict with key '{nested_key}', found {keys}")
        obj = obj[nested_key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where}: expected a state dict (name -> tensor)")
    return obj


def read_state_dict(path: Path, what: str, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict stored in `path` (under `nested_key` if given)."""
    return as_state_dict(read_torch_file(path, what), f"{what} at {path}", nested_key)


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], where: str, ignored: Iterable[str] = ()) -> None:
    """Load `state` into `module` requiring exactly its keys and shapes; `ignored` keys may be present."""
    skip = set(ignored)
    state = {k: v for k, v in state.items() if k not in skip}
    check_state_dict(where, state, module.state_dict())
    module.load_state_dict(state, strict=True)


@contextlib.contextmanager
def seeded_init(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Draw random initial weights from `seed` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def finish_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Eval mode, frozen, on `device` in `dtype`."""
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def load_hf_pretrained(cls: Any, directory: str | None, what: str, source: str, ignore_prefixes: tuple = ()) -> Any:
    """`cls.from_pretrained(directory)` from local files only; any missing or mis-shaped weight is an error.

    Unexpected weights are errors too, except those under `ignore_prefixes` (e.g. the text tower when only
    the vision tower is built) and position-ids buffers that older checkpoints stored.
    """
    if directory is None or not Path(directory).is_dir():
        raise CheckpointError(
            f"{what} directory not found: {directory} (published: {source}); no download is attempted"
        )
    try:
        model, info = cls.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    except Exception as e:  # missing or corrupt files surface as many exception types
        raise CheckpointError(f"{what} at {directory}: cannot load ({source}): {e}") from None
    unexpected = [
        k for k in info["unexpected_keys"] if not k.startswith(ignore_prefixes) and not k.endswith("position_ids")
    ]
    for kind, keys in (
        ("missing", info["missing_keys"]),
        ("mis-shaped", info["mismatched_keys"]),
        ("unexpected", unexpected),
    ):
        if keys:
            shown = ", ".join(str(k) for k in list(keys)[:3])
            raise CheckpointError(f"{what} at {directory}: {len(keys)} {kind} weights: {shown}")
    return model
