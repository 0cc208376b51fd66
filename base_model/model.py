"""NextStepModel: Qwen2 decoder layers over a mixed text / continuous-image sequence, the two image
projectors and the flow head. Module names equal the published state-dict keys (no `model.` prefix):
embed_tokens, layers.*, norm, lm_head, image_in_projector, image_out_projector, image_head.net.*,
and the `gen_pos_embed` buffer when config.use_gen_pos_embed.

The decoder layers take the published config's bias layout (attention_bias for q/k/v, o_attention_bias
for o_proj, mlp_bias for the MLP; see NextStepConfig), not Qwen2's fixed one.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import AttentionInterface
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from base_model.config import NextStepConfig
from base_model.head import FlowHead
from base_model.sequence import attention_mask_4d
from core.errors import UserError

GEN_POS_GRID = 32  # side of NextStep's gen_pos_embed table (hard-coded there: 32 x 32 = 1024 tokens)


def gen_pos_embed_table(hidden_size: int, grid: int = GEN_POS_GRID) -> torch.Tensor:
    """MAE's 2-D sin-cos table as NextStep builds it -> [1, grid*grid, hidden] fp32.

    Token p = r * grid + c (raster order) gets [e(c) | e(r)], each half e(pos) = [sin(pos w) | cos(pos w)]
    with w_i = 10000^(-i / (H/4)), i < H/4 (computed in fp64, as published with numpy).
    """
    if hidden_size % 4:
        raise ValueError(f"gen_pos_embed needs hidden_size divisible by 4, got {hidden_size}")
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [H/4]
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)  # [G*G] each

    def half(p: torch.Tensor) -> torch.Tensor:  # [G*G] -> [G*G, H/2]
        angles = p[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([half(cols), half(rows)], dim=-1).float()[None]


def apply_bias_layout(layer: Qwen2DecoderLayer, config: NextStepConfig) -> None:
    """Give a Qwen2 layer (q/k/v biased, o_proj and MLP not) the config's biases, rebuilding only the
    Linears whose bias differs (same shapes, device and dtype; fresh weights: init or load follows)."""
    wanted = {
        **dict.fromkeys(("q_proj", "k_proj", "v_proj"), (layer.self_attn, config.attention_bias)),
        "o_proj": (layer.self_attn, config.o_attention_bias),
        **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), (layer.mlp, config.mlp_bias)),
    }
    for name, (parent, bias) in wanted.items():
        old = getattr(parent, name)
        if (old.bias is not None) != bool(bias):
            w = old.weight
            setattr(parent, name, nn.Linear(old.in_features, old.out_features, bias=bool(bias),
                                            device=w.device, dtype=w.dtype))  # fmt: skip


GROUPED_SDPA = "nextstep_grouped_sdpa"  # our attention function's name in transformers' registry


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """GQA without repeat_kv: each kv head's G = Hq/Hkv query heads are folded into the query axis.

    query [R, Hq, Lq, D]; key, value [R, Hkv, Lk, D] (the whole preallocated cache, read as it is);
    attention_mask [R, 1, Lq, Lk'] bool (Lk' >= Lk) or None -> (out [R, Lq, Hq, D], None).
    Query head h = kv * G + i (repeat_kv's order) becomes row i * Lq + l of kv head kv, so every SDPA
    kernel that takes a mask sees plain multi-head attention over Hkv heads; transformers' SDPA path
    instead copies the cache G times per layer per step (its enable_gqa needs mask None).
    """
    r, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if attention_mask is None:  # unmasked (causal) calls keep the query layout
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                             is_causal=lq > 1, enable_gqa=True)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    g = hq // hkv
    q = query.reshape(r, hkv, g * lq, d)  # [R, Hkv, G*Lq, D]
    mask = attention_mask[..., :lk]  # [R|1, 1, Lq, Lk]
    mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * lq, lk)  # a view when Lq = 1
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.view(r, hq, lq, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)


def pick_attention(config: NextStepConfig) -> str:
    """Grouped SDPA (default), transformers' "sdpa" (repeat_kv; kept for comparisons) or eager.

    Our masks are 4-D boolean (left padding + preallocated cache), which transformers'
    flash-attention-2 path does not take, so a flash_attention_2 request falls back to grouped SDPA
    (PyTorch's memory-efficient / cuDNN kernels accept the mask) with a warning. The sampler can use
    flash-attn's kvcache kernel instead (`sampling.attention: flash`, base_model/flash_attention.py)."""
    want = getattr(config, "_attn_implementation_internal", None) or GROUPED_SDPA
    if want == "flash_attention_2":
        warnings.warn("flash_attention_2 does not take our 4-D masks: using grouped SDPA "
                      "(for sampling, set sampling.attention: flash)", stacklevel=2)  # fmt: skip
    return want if want in ("eager", "sdpa") else GROUPED_SDPA


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

    def first_rows(self, rows: int) -> KVCache:
        """The same buffers restricted to rows [0, rows) (views: writes land in this cache)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[:rows] for k in self.keys]
        view.values = [v[:rows] for v in self.values]
        view.max_len = self.max_len
        return view

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
        for layer in self.layers:
            apply_bias_layout(layer, config)
        self.norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.image_in_projector = nn.Linear(d, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowHead(d, hidden, config.fm_head_dim, config.fm_head_layers)
        if config.use_gen_pos_embed:  # a buffer, saved with the weights as published
            self.register_buffer("gen_pos_embed", gen_pos_embed_table(hidden), persistent=True)

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
        rope_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder layers + final RMSNorm.

        embeds [R, Lq, H]; positions [Lq] long (cache positions of the queries);
        key_valid [R, Lk] bool (Lk = cache.max_len with a cache, else Lq) -> normed hidden [R, Lq, H].
        rope_positions [R, Lq] long: each row's RoPE positions (Self-CoT rows count their valid tokens
        only); None: the cache positions (they count left padding, as published).
        """
        mask = attention_mask_4d(key_valid, positions)
        if self.config._attn_implementation == "eager":  # transformers' eager path adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min)  # fmt: skip
        position_ids = positions[None].expand(embeds.shape[0], -1) if rope_positions is None else rope_positions
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
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor | None,
        rope_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass over finished sequences: ids [R, L], mask [R, L] -> hidden [R, L, H]
        (rope_positions [R, L]: see `backbone`)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.backbone(self.embed(input_ids, image_tokens), attention_mask, positions,
                             rope_positions=rope_positions)  # fmt: skip

    def text_log_pi(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden [..., H] -> the next text token's log-softmax [..., V] fp32."""
        return torch.log_softmax(self.lm_head(hidden).float(), dim=-1)

    # -- image side -----------------------------------------------------------------------------
    def image_condition(self, hidden: torch.Tensor, token_index: int | torch.Tensor = 0) -> torch.Tensor:
        """Normed hidden state -> head condition image_out_projector(h_j + gen_pos_embed[j]).

        hidden [R, H] conditions image token j = token_index; [R, T, H] tokens token_index..+T-1.
        The position term is NextStep's pipeline's, added only when config.use_gen_pos_embed.
        A 0-d long tensor token_index (hidden [R, H] only) is read on the device: no host sync, the
        same kernels whatever j (CUDA graphs); the caller checks it against the table's size.
        """
        if self.config.use_gen_pos_embed and isinstance(token_index, torch.Tensor):
            pos = self.gen_pos_embed[0].index_select(0, token_index.reshape(1))  # [1, H]
            return self.image_out_projector(hidden + pos.to(hidden.dtype))
        if self.config.use_gen_pos_embed:
            n = hidden.shape[1] if hidden.ndim == 3 else 1
            table = self.gen_pos_embed[0]  # [G*G, H]
            if token_index + n > table.shape[0]:
                raise UserError(f"use_gen_pos_embed: the checkpoint's position table covers {table.shape[0]} "
                                f"image tokens, this image needs {token_index + n}: sample a smaller one")  # fmt: skip
            pos = table[token_index : token_index + n].to(hidden.dtype)  # [n, H]
            hidden = hidden + (pos if hidden.ndim == 3 else pos[0])
        return self.image_out_projector(hidden)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head velocity: x [N, 64] (any float dtype), t [N], cond [N, H] -> [N, 64] fp32.

        t is rounded to the head's dtype first, as published (`ti.to(c)`): a no-op in fp32, and in bf16
        the times the head was trained on."""
        head_dtype = self.image_head.net.input_proj.weight.dtype
        return self.image_head(x.to(head_dtype), t.to(head_dtype), cond.to(head_dtype)).float()
