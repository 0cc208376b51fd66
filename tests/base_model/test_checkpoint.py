"""Checkpoints in the published layout: round trips, hand-written checkpoints and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from base_model.checkpoint import INDEX_NAME, load_checkpoint, save_checkpoint
from base_model.generate import generate_images
from base_model.sampler import SamplingConfig
from core.errors import CheckpointError

SMALL = SamplingConfig(image_size=64, cfg_scale=2.0, num_head_steps=4)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(tiny, out, max_shard_bytes=200_000)
    return out


def test_layout_on_disk(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", INDEX_NAME, "tokenizer.json", "vae"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((saved / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] > 0
    assert "embed_tokens.weight" in index["weight_map"]
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "nextstep" and config["fm_head_batch_mul"] == 4
    assert (saved / "vae" / "checkpoint.pt").is_file() and (saved / "vae" / "config.json").is_file()
    assert not list(saved.parent.glob(".model.tmp-*"))  # nothing half-written left behind


def test_save_then_load_gives_identical_outputs(tiny, saved):
    loaded = load_checkpoint(saved)
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    a = generate_images(tiny, ["a red circle", "b"], [1, 2], SMALL)
    b = generate_images(loaded, ["a red circle", "b"], [1, 2], SMALL)
    assert torch.equal(a, b)


def test_load_in_bfloat16(saved):
    loaded = load_checkpoint(saved, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    imgs = generate_images(loaded, ["a"], [0], SMALL)
    assert imgs.shape == (1, 3, 64, 64)


def _write_published(tiny, directory: Path, state: dict) -> None:
    """Write a checkpoint by hand, as the authors publish it: 3 shards + index + config + tokenizer + vae."""
    from base_model.vae import save_vae

    directory.mkdir(parents=True)
    keys = list(state)
    parts = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    config = tiny.model.config.to_dict()
    config.pop("_attn_implementation_internal", None)
    config.update(model_type="nextstep", architectures=["NextStep"], auto_map={"AutoModel": "x.NextStep"})
    (directory / "config.json").write_text(json.dumps(config))
    tiny.tokenizer.save_pretrained(str(directory))
    save_vae(tiny.vae, directory / "vae")


def test_a_hand_written_published_checkpoint_loads(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state["gen_pos_embed"] = torch.zeros(1, 16, tiny.model.config.hidden_size)  # published extra: ignored
    _write_published(tiny, tmp_path / "pub", state)
    loaded = load_checkpoint(tmp_path / "pub")
    assert torch.equal(loaded.model.lm_head.weight, tiny.model.lm_head.weight)


def _first_shard(directory: Path) -> Path:
    return sorted(directory.glob("model-*.safetensors"))[0]


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_missing_directory_and_config(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    d = _copy(saved, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)


def test_corrupt_shard_is_named(tmp_path, saved):
    d = _copy(saved, tmp_path)
    shard = _first_shard(d)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(d)


def test_missing_shard_is_named(tmp_path, saved):
    d = _copy(saved, tmp_path)
    shard = _first_shard(d)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        load_checkpoint(d)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, saved):
    d = _copy(saved, tmp_path)
    shard = _first_shard(d)
    tensors = load_file(str(shard))
    victim = sorted(tensors)[0]
    # missing: drop a key from both the shard and the index
    save_file({k: v for k, v in tensors.items() if k != victim}, str(shard))
    index = json.loads((d / INDEX_NAME).read_text())
    del index["weight_map"][victim]
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"1 missing keys: {victim}"):
        load_checkpoint(d)
    # unexpected
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, str(shard))
    with pytest.raises(CheckpointError, match="1 unexpected keys: model.extra.weight"):
        load_checkpoint(d)
    # shape mismatch
    bad = dict(tensors)
    bad[victim] = torch.zeros(*(s + 1 for s in tensors[victim].shape))
    save_file(bad, str(shard))
    with pytest.raises(CheckpointError, match=f"shape mismatch for {victim}"):
        load_checkpoint(d)


def test_missing_vae_is_named(tmp_path, saved):
    d = _copy(saved, tmp_path)
    (d / "vae" / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(d)
