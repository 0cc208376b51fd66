"""`nsalign generate` through the same entry point users call."""

import numpy as np
from PIL import Image

from jobs.cli import main


def test_generate_tiny_writes_a_grid(tmp_path):
    out = tmp_path / "g.png"
    rc = main(["generate", "--checkpoint", "tiny", "--prompt", "a red circle", "--prompt", "two squares",
               "--num-images", "3", "--steps", "4", "--out", str(out)])  # fmt: skip
    assert rc == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    assert not list(tmp_path.glob(".*tmp"))


def test_generate_bad_input_exits_2_with_one_message(tmp_path, capsys):
    cases = [
        ["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"],
        ["--checkpoint", "tiny", "--prompt", "x", "--size", "100"],
        ["--checkpoint", "tiny", "--prompt", "  "],
        ["--checkpoint", "tiny", "--prompt", "x", "--steps", "0"],
    ]
    for extra in cases:
        rc = main(["generate", *extra, "--out", str(tmp_path / "o.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, extra
        assert len(err) == 1 and err[0].startswith("nsalign generate: error:"), err
    assert not (tmp_path / "o.png").exists()
