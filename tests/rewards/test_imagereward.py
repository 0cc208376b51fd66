"""ImageReward: published architecture size and key layout, tokenizer, normalisation, tiny model."""

import json

import pytest
import torch

from core.errors import CheckpointError, ConfigError
from core.schema import from_dict
from rewards.imagereward import (
    MED_CONFIG_TINY,
    PUBLISHED_UNUSED_KEYS,
    Config,
    build,
    build_model,
    load_tokenizer,
    standardise,
)
from tests.rewards.helpers import image_tower, layer_norm, linear, random_images, rating_mlp

CPU = torch.device("cpu")


def bert_with_cross_attention(hidden: int, layers: int, ff: int, vocab: int, positions: int, image_width: int) -> int:
    """BLIP's BERT: word + position embeddings (no token types) + LayerNorm; per layer self-attention
    (q, k, v, out + LN), cross-attention (q from text, k and v from image width, out + LN), FFN (+ LN)."""
    self_attn = 4 * linear(hidden, hidden) + layer_norm(hidden)
    cross_attn = 2 * linear(hidden, hidden) + 2 * linear(image_width, hidden) + layer_norm(hidden)
    ffn = linear(hidden, ff) + linear(ff, hidden) + layer_norm(hidden)
    return vocab * hidden + positions * hidden + layer_norm(hidden) + layers * (self_attn + cross_attn + ffn)


def test_full_architecture_matches_the_published_model_size(bert_vocab_dir):
    # BLIP ViT-L/16 (conv with bias, final LayerNorm only, no head) + BERT-base with cross-attention to
    # 1024-wide image tokens (med_config: 12 x 768, FFN 3072, vocab 30524, 512 positions) + rating MLP.
    vit = image_tower(1024, 24, 16, conv_bias=True, num_norms=1, proj=0)
    bert = bert_with_cross_attention(768, 12, 3072, 30524, 512, image_width=1024)
    expected = vit + bert + rating_mlp(768)
    assert (vit, expected) == (303_301_632, 446_206_689)
    with torch.device("meta"):
        model = build_model(Config(vocab_dir=bert_vocab_dir, init="random"))
    assert sum(p.numel() for p in model.parameters()) == expected
    # The published file also holds BLIP's unused ITC projections 1024->256 and 768->256: 446,665,953
    # floats = 1.787e9 bytes in fp32, the size of ImageReward.pt on the hub (1.79 GB).
    assert expected + linear(1024, 256) + linear(768, 256) == 446_665_953
    keys = set(model.state_dict())
    for key in ("blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.23.attn.qkv.weight",
                "blip.visual_encoder.norm.bias", "blip.text_encoder.embeddings.word_embeddings.weight",
                "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight", "mlp.layers.7.bias"):  # fmt: skip
        assert key in keys
    assert model.state_dict()["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (768, 1024)


def test_standardisation_is_the_published_one():
    raw = torch.tensor([0.16717362830052426, 0.16717362830052426 + 1.0333394966054072, 0.0])
    torch.testing.assert_close(standardise(raw), torch.tensor([0.0, 1.0, -0.16717362830052426 / 1.0333394966054072]))


def test_tokenizer_is_uncased_wordpiece_with_dec_and_enc(bert_vocab_dir):
    tok = load_tokenizer(bert_vocab_dir, 30524)
    assert len(tok) == 30524
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    ids = tok(["A RED Cat"], padding="max_length", truncation=True, max_length=35).input_ids[0]
    assert len(ids) == 35 and tok.convert_ids_to_tokens(ids[:5]) == ["[CLS]", "a", "red", "cat", "[SEP]"]


def test_a_truncated_vocabulary_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(CheckpointError, match="expects vocab_size 30524"):
        load_tokenizer(str(tmp_path), 30524)
    with pytest.raises(CheckpointError, match="vocab.txt not found"):
        load_tokenizer(str(tmp_path / "nowhere"), 30524)


def test_config_requires_the_published_files_unless_random():
    with pytest.raises(ConfigError, match=r"r\.checkpoint: required"):
        from_dict(Config, {"vocab_dir": "v"}, "r")
    with pytest.raises(ConfigError, match=r"r\.vocab_dir"):
        from_dict(Config, {"init": "random"}, "r")
    assert from_dict(Config, {"vocab_dir": "v", "init": "random", "size": "tiny"}, "r").size == "tiny"


@pytest.fixture(scope="module")
def tiny(bert_vocab_dir):
    return build(Config(vocab_dir=bert_vocab_dir, size="tiny", init="random"), CPU, torch.float32)


def test_tiny_scores_are_batched_and_deterministic(tiny):
    images, prompts = random_images(3, 48, 80), ["a red cat", "two dogs on a bench", "a photo"]
    out = tiny(images, prompts)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, standardise(out.components["raw"]))
    torch.testing.assert_close(tiny(images[1:2], prompts[1:2]).scores, out.scores[1:2], atol=1e-5, rtol=1e-5)
    assert tiny(images, ["something else"] * 3).scores[0] != out.scores[0]  # the prompt matters


def test_published_layout_checkpoint_loads_exactly(tiny, bert_vocab_dir, tmp_path):
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in tiny.model.state_dict().items()}
    extra = {"blip.vision_proj.weight": torch.zeros(256, 32), "blip.vision_proj.bias": torch.zeros(256),
             "blip.text_proj.weight": torch.zeros(256, 32), "blip.text_proj.bias": torch.zeros(256),
             "blip.text_encoder.embeddings.position_ids": torch.arange(64)[None]}  # fmt: skip
    assert set(extra) == set(PUBLISHED_UNUSED_KEYS)
    torch.save({**state, **extra}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({**MED_CONFIG_TINY, "encoder_width": 768}))
    config = Config(str(tmp_path / "ImageReward.pt"), str(tmp_path / "med_config.json"), bert_vocab_dir, size="tiny")
    loaded = build(config, CPU, torch.float32)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])

    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "broken.pt")
    config.checkpoint = str(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken\.pt: 1 missing keys: mlp\.layers\.7\.bias"):
        build(config, CPU, torch.float32)
    config.checkpoint = str(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match=r"absent\.pt \(published: hub THUDM/ImageReward"):
        build(config, CPU, torch.float32)


class _Recorder:
    """Stands in for the ImageReward model: records what __call__ feeds it, returns raw 0."""

    def __call__(self, pixels, input_ids, attention_mask):
        self.pixels, self.input_ids, self.attention_mask = pixels, input_ids, attention_mask
        return torch.zeros(pixels.shape[0])


def test_call_site_preprocessing_by_hand(tiny):
    """A 32 x 64 (H x W) black image with a white stripe in columns 0-15: BLIP resizes the short side to
    32 (already) and centre-crops columns 16-47, so the stripe is gone (a squash to 32 x 32 would keep
    columns 0-7 white). Every pixel is then black under the OpenAI CLIP mean/std (not ImageNet's):
    (0 - 0.48145466) / 0.26862954 = -1.792263, -0.4578275 / 0.26130258 = -1.752097, -0.40821073 / 0.27577711
    = -1.480220. Prompts are padded to exactly 35 tokens (ImageReward.py), the mask marks the real ones:
    [CLS] a red cat [SEP] = 5."""
    recorder, model = _Recorder(), tiny.model
    tiny.model = recorder
    try:
        image = torch.zeros(1, 3, 32, 64, dtype=torch.uint8)
        image[..., :16] = 255
        out = tiny(image, ["a red cat"])
    finally:
        tiny.model = model
    assert recorder.pixels.shape == (1, 3, 32, 32)
    black = torch.tensor([-1.792263, -1.752097, -1.480220]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    torch.testing.assert_close(recorder.pixels, black, atol=1e-5, rtol=0)
    assert recorder.input_ids.shape == (1, 35) and int(recorder.attention_mask.sum()) == 5
    torch.testing.assert_close(out.scores, standardise(torch.zeros(1)))


def test_blip_vit_layer_norms_use_eps_1e6(tiny):
    """BLIP's ViT builds its LayerNorms with eps 1e-6 (timm style), not torch's 1e-5: two per block + the final."""
    norms = [m for m in tiny.model.blip.visual_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == 1e-6 for m in norms)
