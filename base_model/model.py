"""NextStepModel: Qwen2 decoder layers over a mixed text / continuous-image sequence, the two image
projectors and the flow head. Module names equal the published state-dict keys (no `model.` prefix):
embed_tokens, layers.*, norm, lm_head, image_in_projector, image_out_projector, image_head.net.*.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from base_model.config import NextStepConfig
from base_model.head import FlowHead
from base_model.sequence import attention_mask_4d


def pick_attention(config: NextStepConfig) -> str:
    """SDPA (default) or eager. Our masks are 4-D boolean (left padding + preallocated cache), which
    transformers' flash-attention-2 path does not take, so a flash_attention_2 request falls back to
    SDPA (its memory-efficient / cuDNN kernels accept the mask) with a warning."""
    want = getattr(config, "_attn_implementation_internal", None) or "sdpa"
    if want == "flash_attention_2":
        import warnings

        warnings.warn("flash_attention_2 is not wired for 4-D masks yet; using SDPA", stacklevel=2)
    return want if want == "eager" else "sdpa"


class KVCache:
    """Preallocated key/value buffers [R, kv_heads, max_len, head_dim] per layer.

    Implements the one method the transformers attention calls (`update`), writing at
    `cache_position` and returning the whole buffer; the attention mask hides unwritten slots, so
    every decode step has the same shapes (no reallocation, per-token cost flat in sequence length).
    """

    def __init__(self, config: NextStepConfig, rows: int, max_len: int, dtype: torch.dtype, device):
        shape = (rows, config.num_key_value_heads, max_len, config.head_dim_)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs: dict | None = None):
        pos = cache_kwargs["cache_position"]
        self.keys[layer_idx].index_copy_(2, pos, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, pos, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]


class NextStepModel(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        config._attn_implementation = pick_attention(config)
        if getattr(config, "head_dim", None) is None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        self.config = config
        hidden, d = config.hidden_size, config.token_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.image_in_projector = nn.Linear(d, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowHead(d, hidden, config.fm_head_dim, config.fm_head_layers)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def place(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> NextStepModel:
        """Move/cast the model; the RoPE inverse frequencies are rebuilt in fp32 (a bf16 cast would round them)."""
        self.rotary_emb = Qwen2RotaryEmbedding(config=self.config)  # may still be on meta after loading
        self.to(device=device, dtype=dtype)
        self.rotary_emb = Qwen2RotaryEmbedding(config=self.config, device=self.embed_tokens.weight.device)
        return self

    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Random init for from-scratch models: normal(0, std) linears/embeddings, unit norms, zero biases."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    m.weight.normal_(0.0, std, generator=generator)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            layer.gradient_checkpointing = enabled
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    # -- embeddings -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [R, L]; image_tokens [R, T, 64] fill the placeholder positions in order -> [R, L, H]."""
        is_img = input_ids == self.config.image_placeholder_id  # [R, L]
        embeds = self.embed_tokens(input_ids.masked_fill(is_img, 0))
        if image_tokens is None:
            return embeds
        img = self.image_in_projector(image_tokens.to(embeds.dtype))  # [R, T, H]
        return embeds.masked_scatter(is_img[..., None], img)

    # -- backbone -------------------------------------------------------------------------------
    def backbone(
        self,
        embeds: torch.Tensor,
        key_valid: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Decoder layers + final RMSNorm.

        embeds [R, Lq, H]; positions [Lq] long (cache positions of the queries);
        key_valid [R, Lk] bool (Lk = cache.max_len with a cache, else Lq) -> normed hidden [R, Lq, H].
        """
        mask = attention_mask_4d(key_valid, positions)
        position_ids = positions[None].expand(embeds.shape[0], -1)
        pos_emb = self.rotary_emb(embeds, position_ids)
        h = embeds
        for layer in self.layers:
            h = layer(
                h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                cache_position=positions, position_embeddings=pos_emb,
            )  # fmt: skip
            if isinstance(h, tuple):
                h = h[0]
        return self.norm(h)

    def forward_sequence(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """Teacher-forced pass over finished sequences: ids [R, L], mask [R, L] -> hidden [R, L, H]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.backbone(self.embed(input_ids, image_tokens), attention_mask, positions)

    # -- image side -----------------------------------------------------------------------------
    def image_condition(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden state h_j [..., H] -> head condition image_out_projector(h_j) [..., H]."""
        return self.image_out_projector(hidden)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head velocity: x [N, 64] (any float dtype), t [N], cond [N, H] -> [N, 64] fp32."""
        head_dtype = self.image_head.net.input_proj.weight.dtype
        return self.image_head(x.to(head_dtype), t, cond.to(head_dtype)).float()
