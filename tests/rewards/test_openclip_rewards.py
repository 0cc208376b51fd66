"""HPSv2 and CLIPScore on OpenCLIP: architecture size, checkpoint layouts, score formulas."""

import pytest
import torch
from torch import nn

from core.errors import CheckpointError, ConfigError
from core.schema import from_dict
from rewards.clipscore import ClipScore, OpenClipScorer, build_open_clip, clip_s
from rewards.clipscore import Config as ClipConfig
from rewards.clipscore import build as build_clipscore
from rewards.common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewards.hps import Config as HpsConfig
from rewards.hps import HPSv2
from rewards.hps import build as build_hps
from tests.rewards.helpers import clip_vit_h14, random_images

CPU = torch.device("cpu")


def test_vit_h_14_has_the_published_parameter_count():
    # open_clip's model profile lists ViT-H-14 at 986.11 M parameters; derived layer by layer in helpers.
    assert clip_vit_h14() == 986_109_441
    with torch.device("meta"):
        model = build_open_clip("ViT-H-14", "full")
    assert sum(p.numel() for p in model.parameters()) == clip_vit_h14()
    assert model.visual.image_size == (224, 224)


class FixedClip(nn.Module):
    """Stands in for an OpenCLIP model: fixed unit embeddings with cosine 0.6 and -0.2."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Module()
        self.visual.image_size = 32
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, pixels, normalize=False):
        assert pixels.shape == (2, 3, 32, 32) and normalize
        return torch.tensor([[1.0, 0.0], [1.0, 0.0]])

    def encode_text(self, tokens, normalize=False):
        return torch.tensor([[0.6, 0.8], [-0.2, 0.9797958971]])


def test_score_formulas_on_hand_set_embeddings():
    scorer = OpenClipScorer(FixedClip(), lambda prompts: torch.zeros(len(prompts), 77, dtype=torch.long),
                            "longest", (0.5,) * 3, (0.5,) * 3)  # fmt: skip
    images, prompts = random_images(2, 40, 20), ["a", "b"]
    torch.testing.assert_close(HPSv2(scorer)(images, prompts).scores, torch.tensor([0.6, -0.2]))
    out = ClipScore(scorer, "clip_s", 100.0)(images, prompts)
    torch.testing.assert_close(out.scores, torch.tensor([60.0, 0.0]))  # 100 * max(cos, 0)
    torch.testing.assert_close(out.components["cosine"], torch.tensor([0.6, -0.2]))
    torch.testing.assert_close(clip_s(torch.tensor([0.3]), 2.5), torch.tensor([0.75]))


def test_hps_checkpoint_is_a_dict_with_state_dict(tmp_path):
    reference = build_hps(HpsConfig(size="tiny", init="random"), CPU, torch.float32)
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in reference.scorer.model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")
    hps = build_hps(HpsConfig(str(tmp_path / "HPS_v2.1_compressed.pt"), size="tiny"), CPU, torch.float32)
    torch.testing.assert_close(hps.scorer.model.state_dict()["text_projection"], state["text_projection"])
    scores = hps(random_images(2, 64, 32), ["a cat", "a dog"]).scores
    assert scores.shape == (2,) and bool((scores.abs() <= 1.0).all())  # cosines

    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="expected a dict with key 'state_dict'"):
        build_hps(HpsConfig(str(tmp_path / "bare.pt"), size="tiny"), CPU, torch.float32)
    with pytest.raises(CheckpointError, match=r"not found at .*missing\.pt \(published: hub xswu/HPSv2"):
        build_hps(HpsConfig(str(tmp_path / "missing.pt"), size="tiny"), CPU, torch.float32)


def test_hps_uses_letterbox_and_clipscore_center_crop():
    hps = build_hps(HpsConfig(size="tiny", init="random"), CPU, torch.float32)
    clip = build_clipscore(ClipConfig(size="tiny", init="random"), CPU, torch.float32)
    white = torch.full((1, 3, 16, 32), 255, dtype=torch.uint8)  # wide: letterbox pads top and bottom
    boxed, cropped = hps.scorer.preprocess(white), clip.scorer.preprocess(white)
    assert boxed.shape == cropped.shape == (1, 3, 32, 32)
    black = (0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(boxed[0, :, 0, 0], black)  # padding
    assert bool((cropped[0, :, 0, 0] > 1.5).all())  # centre crop keeps white everywhere


def test_clipscore_checkpoint_training_layout_and_errors(tmp_path):
    clip = build_clipscore(ClipConfig(size="tiny", init="random"), CPU, torch.float32)
    state = clip.scorer.model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    loaded = build_clipscore(ClipConfig(checkpoint=str(tmp_path / "ckpt.pt"), size="tiny"), CPU, torch.float32)
    images = random_images(2)
    torch.testing.assert_close(loaded(images, ["x", "y"]).scores, clip(images, ["x", "y"]).scores)
    torch.save({k: v for k, v in state.items() if k != "logit_scale"}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="1 missing keys: logit_scale"):
        build_clipscore(ClipConfig(checkpoint=str(tmp_path / "short.pt"), size="tiny"), CPU, torch.float32)
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        from_dict(ClipConfig, {"model_name": "ViT-Q-99", "checkpoint": "x"}, "r")


def test_pretrained_tag_sets_quick_gelu_preprocessing_and_source():
    config = from_dict(ClipConfig, {"model_name": "ViT-L-14", "pretrained_tag": "openai", "checkpoint": "x.bin"}, "r")
    assert config.preprocessing() == ("shortest", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert "timm/vit_large_patch14_clip_224.openai" in config.files()[0].source
    with torch.device("meta"):
        model = build_open_clip("ViT-L-14", "full", quick_gelu=config.tag_config()["quick_gelu"])
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"  # OpenAI weights need it
    with pytest.raises(ConfigError, match="pretrained_tag: 'lion' is not one of openai"):
        from_dict(ClipConfig, {"model_name": "ViT-L-14", "pretrained_tag": "lion", "checkpoint": "x"}, "r")
