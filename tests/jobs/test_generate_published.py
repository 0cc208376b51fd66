"""`nsalign generate --noise published --time-grid ...`: the published pipelines' draws, batch by batch."""

import numpy as np
from PIL import Image

from jobs.cli import main


def _generate(tmp_path, name: str, *extra: str) -> np.ndarray:
    out = tmp_path / name
    rc = main(["generate", "--checkpoint", "tiny", "--prompt", "a red circle", "--prompt", "two squares",
               "--num-images", "2", "--steps", "3", "--seed", "4", "--noise", "published", *extra,
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    return np.asarray(Image.open(out)).astype(int)


def test_published_noise_does_not_depend_on_how_captions_are_batched(tmp_path):
    """Batches of whole captions replay the one published call (seed 4, num_images_per_caption 2): one
    batch of 4 images or two of 2 give the same grid, on either time grid (up to a level of rounding in the
    uint8 image)."""
    one_call = _generate(tmp_path, "one.png", "--batch-size", "4", "--time-grid", "final_euler")
    per_caption = _generate(tmp_path, "two.png", "--batch-size", "2", "--time-grid", "final_euler")
    assert one_call.shape == (2 * 64, 2 * 64, 3)
    assert np.abs(one_call - per_caption).max() <= 1
    uniform = _generate(tmp_path, "uniform.png", "--batch-size", "4")  # the default grid
    assert np.abs(uniform - _generate(tmp_path, "uniform2.png", "--batch-size", "2")).max() <= 1
    assert np.abs(one_call - uniform).max() > 1  # the grid is a real choice


def test_published_noise_needs_whole_captions_per_batch(tmp_path, capsys):
    rc = main(["generate", "--checkpoint", "tiny", "--prompt", "x", "--num-images", "2", "--batch-size", "3",
               "--noise", "published", "--out", str(tmp_path / "o.png")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "multiple of --num-images" in err[0], err
