"""PickScore and the LAION aesthetic predictor on transformers CLIP: sizes, loading, score formulas."""

import math

import pytest
import torch

from core.errors import CheckpointError
from rewards import aesthetic, pickscore
from rewards.common import to_pil
from tests.rewards.helpers import clip_vit_h14, clip_vit_l14_image, random_images, rating_mlp

CPU = torch.device("cpu")


def test_full_architectures_match_the_published_sizes():
    with torch.device("meta"):
        pick = pickscore.build_model(pickscore.Config(model_dir="unused", init="random"))
        aes = aesthetic.build_model(aesthetic.Config(init="random"))
    # PickScore_v1 is CLIP ViT-H/14, the same tensors as OpenCLIP ViT-H-14 (986.11 M).
    assert sum(p.numel() for p in pick.parameters()) == clip_vit_h14() == 986_109_441
    # CLIP ViT-L/14 image tower with its 1024 -> 768 projection (304 M), then the 768-... rating MLP.
    assert sum(p.numel() for p in aes.vision.parameters()) == clip_vit_l14_image() == 303_966_208
    assert sum(p.numel() for p in aes.mlp.parameters()) == rating_mlp(768) == 927_969


def test_clip_tokenizer_from_open_clip_vocab_matches_open_clip(clip_processor_dir):
    import open_clip

    processor = pickscore.load_processor(clip_processor_dir)
    assert len(processor.tokenizer) == 49408
    text = "A photo of a Cat, riding a bicycle!"
    ours = processor.tokenizer(text).input_ids
    assert ours == open_clip.get_tokenizer("ViT-H-14")([text])[0][: len(ours)].tolist()


def test_pickscore_tokenizer_is_the_fast_one_as_autoprocessor(clip_processor_dir):
    """PickScore's AutoProcessor gives the fast CLIP tokenizer, which does not run ftfy: `&amp;` stays
    three tokens ('&', 'amp', ';') where the slow tokenizer would first turn it into '&'."""
    from transformers import CLIPTokenizerFast

    tok = pickscore.load_processor(clip_processor_dir).tokenizer
    assert isinstance(tok, CLIPTokenizerFast)
    ids = tok("tom &amp; jerry").input_ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["tom</w>", "&</w>", "amp</w>", ";</w>", "jerry</w>"]
    assert ids != tok("tom & jerry").input_ids


@pytest.fixture(scope="module")
def tiny_pick(clip_processor_dir):
    config = pickscore.Config(processor_dir=clip_processor_dir, size="tiny", init="random", divisor=26.0)
    return pickscore.build(config, CPU, torch.float32)


def test_pickscore_is_logit_scale_times_cosine(clip_processor_dir, monkeypatch):
    # Hand-set embeddings with cosine 0.6 and logit scale exp(log 100) = 100 -> raw 60, trained on 60 / 26.
    # A model of its own: the module's `tiny_pick` stays untouched for the tests after this one.
    config = pickscore.Config(processor_dir=clip_processor_dir, size="tiny", init="random", divisor=26.0)
    pick = pickscore.build(config, CPU, torch.float32)
    model = pick.model
    monkeypatch.setattr(model, "get_image_features", lambda pixel_values: torch.tensor([[3.0, 0.0]]))
    monkeypatch.setattr(model, "get_text_features", lambda **kw: torch.tensor([[0.6, 0.8]]))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    out = pick(random_images(1), ["a cat"])
    torch.testing.assert_close(out.components["cosine"], torch.tensor([0.6]))
    torch.testing.assert_close(out.components["raw"], torch.tensor([60.0]))
    torch.testing.assert_close(out.scores, torch.tensor([60.0 / 26.0]))


def test_pickscore_loads_a_local_model_dir_strictly(tiny_pick, clip_processor_dir, tmp_path):
    tiny_pick.model.save_pretrained(tmp_path / "model")
    config = pickscore.Config(model_dir=str(tmp_path / "model"), processor_dir=clip_processor_dir)
    loaded = pickscore.build(config, CPU, torch.float32)
    images, prompts = random_images(2, 80, 60), ["a red car", "a dog"]
    torch.testing.assert_close(loaded(images, prompts).scores, tiny_pick(images, prompts).scores * 26.0)
    with pytest.raises(CheckpointError, match="PickScore model directory not found"):
        pickscore.build(pickscore.Config(model_dir=str(tmp_path / "nope"), processor_dir=clip_processor_dir), CPU,
                        torch.float32)  # fmt: skip


def test_aesthetic_rates_the_normalised_embedding(tmp_path):
    reward = aesthetic.build(aesthetic.Config(size="tiny", init="random"), CPU, torch.float32)
    images = random_images(2, 48, 96)
    pixels = reward.processor(images=to_pil(images), return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 64, 64)
    emb = reward.model.vision(pixel_values=pixels).image_embeds
    by_hand = reward.model.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(reward(images, ["", ""]).scores, by_hand)


def test_aesthetic_checkpoints_in_published_layout(tmp_path):
    reference = aesthetic.build(aesthetic.Config(size="tiny", init="random"), CPU, torch.float32)
    # the CLIP directory holds both towers, as openai/clip-vit-large-patch14 does
    from transformers import CLIPConfig, CLIPModel

    vision_cfg = reference.model.vision.config.to_dict()
    text_cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    full = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=32))
    full.vision_model.load_state_dict(reference.model.vision.vision_model.state_dict())
    full.visual_projection.load_state_dict(reference.model.vision.visual_projection.state_dict())
    full.save_pretrained(tmp_path / "clip")
    reference.processor.save_pretrained(tmp_path / "clip")
    mlp_state = reference.model.mlp.state_dict()
    assert sorted(mlp_state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(mlp_state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    config = aesthetic.Config(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), str(tmp_path / "clip"))
    loaded = aesthetic.build(config, CPU, torch.float32)
    images = random_images(3, 70, 70)
    torch.testing.assert_close(loaded(images, [""] * 3).scores, reference(images, [""] * 3).scores)

    torch.save({"layers.0.weight": mlp_state["layers.0.weight"]}, tmp_path / "partial.pth")
    config.mlp_checkpoint = str(tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="partial.pth: 9 missing keys"):
        aesthetic.build(config, CPU, torch.float32)
