"""NextStepConfig: the published config.json fields (Qwen2 backbone + NextStep additions) and presets.

Values not confirmed against a published config.json (vocab size, rope_theta, the image-area token id)
are plain config fields: a published config.json overrides them.

Biases of the decoder layers, as NextStep-1's config (a LlamaConfig) reads them: q/k/v take
`attention_bias`, o_proj `o_attention_bias` (None: same as attention_bias), the MLP `mlp_bias`. A
config.json without `attention_bias` (Qwen2-based ones: NextStep-1.1's, and ours before these keys)
gets Qwen2's fixed layout instead: q/k/v biased, o_proj and MLP not.
"""

from __future__ import annotations

from transformers import Qwen2Config

from core.errors import ConfigError


class NextStepConfig(Qwen2Config):
    """Qwen2 decoder fields plus the image-generation fields of the published `config.json`."""

    model_type = "nextstep"

    def __init__(
        self,
        vae_name_or_path: str | None = "vae",
        latent_size: int = 32,
        latent_patch_size: int = 2,
        latent_channels: int = 16,
        boi: int | None = None,
        eoi: int | None = None,
        image_placeholder_id: int | None = None,
        image_area_id: int | None = None,
        pad_token_id_added: int | None = None,
        lm_loss_weight: float = 0.01,
        im_loss_weight: float = 1.0,
        fm_head_dim: int = 1536,
        fm_head_layers: int = 12,
        fm_head_batch_mul: int = 4,
        use_gen_pos_embed: bool = False,
        attention_bias: bool | None = None,
        o_attention_bias: bool | None = None,
        mlp_bias: bool = False,
        **kwargs,
    ):
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.vae_name_or_path = vae_name_or_path
        self.latent_size = latent_size
        self.latent_patch_size = latent_patch_size
        self.latent_channels = latent_channels
        self.boi = boi
        self.eoi = eoi
        self.image_placeholder_id = image_placeholder_id
        self.image_area_id = image_area_id
        self.pad_token_id_added = pad_token_id_added
        self.lm_loss_weight = lm_loss_weight
        self.im_loss_weight = im_loss_weight
        self.fm_head_dim = fm_head_dim
        self.fm_head_layers = fm_head_layers
        self.fm_head_batch_mul = fm_head_batch_mul
        self.use_gen_pos_embed = use_gen_pos_embed  # add gen_pos_embed[j] to image token j's condition
        if attention_bias is None:  # Qwen2's layout (see the module docstring)
            self.attention_bias = True
            self.o_attention_bias = bool(o_attention_bias)
        else:  # NextStep-1's rule
            self.attention_bias = attention_bias
            self.o_attention_bias = attention_bias if o_attention_bias is None else o_attention_bias
        self.mlp_bias = mlp_bias

    @property
    def token_dim(self) -> int:
        """Width of one continuous image token: latent channels x patch area (16 x 2 x 2 = 64)."""
        return self.latent_channels * self.latent_patch_size**2

    @property
    def head_dim_(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads


# Published special-token ids of the Qwen2.5 tokenizer extended by NextStep (image_area UNVERIFIED).
LARGE_SPECIAL_IDS = dict(
    pad_token_id_added=151665, image_area_id=151666, boi=151667, eoi=151668, image_placeholder_id=151669
)

# model specs that name a preset built with random weights in-process, not a checkpoint directory
RANDOM_PRESETS = ("tiny", "mid")

# Each preset: backbone sizes + head sizes. `tiny` runs a 64x64 image on a CPU in well under a second;
# `mid` is the CPU benchmark size; `nextstep-1-large` is the published model.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, fm_head_dim=64, fm_head_layers=2, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, latent_size=4,
    ),
    "mid": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1408, fm_head_dim=256, fm_head_layers=4, max_position_embeddings=8192,
        rope_theta=1e6, rms_norm_eps=1e-5, latent_size=4,
    ),
    "nextstep-1-large": dict(
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        intermediate_size=13824, fm_head_dim=1536, fm_head_layers=12, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-5, vocab_size=152064, latent_size=32, **LARGE_SPECIAL_IDS,
    ),
}  # fmt: skip


def preset_config(name: str, **overrides) -> NextStepConfig:
    """A NextStepConfig from a named preset; `overrides` win (e.g. vocab_size and token ids of a tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    fields = dict(PRESETS[name])
    fields.update(overrides)
    return NextStepConfig(**fields)
