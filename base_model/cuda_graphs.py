"""The sampler loop with static shapes, so that CUDA graphs can replay it (`sampling.cuda_graphs`).

Same tokens as `sampler.sample_tokens` (the reference loop, which the CPU runs), computed differently:
every per-token input lives in a preallocated device buffer (token index j, prompt length, head
condition, fed-back token, seeds, noise), so the K-step head loop of one image token and the backbone
decode step each read and write fixed addresses with fixed shapes. On CUDA each is captured once as a
`torch.cuda.CUDAGraph` and replayed per token: ~K x (12 blocks x ~10) kernel launches of the head
become one replay, the 48-layer decode step another, and nothing in the loop reads the device from
the host. On a CPU (tests) the same two functions run eagerly.

The KV cache spans a length rounded up to CACHE_LEN_MULTIPLE, so batches whose longest prompt
differs a little reuse one captured runner (slots past the query are causally masked: unread).
One runner per model is kept between calls (its KV cache is most of its memory); a batch of other
shapes or settings, or moved weights (new data pointers), builds a new one. Weights loaded in place
(`copy_`, as weight sync does) are seen by the captured graphs.

`sampling.compile` wraps the head net (`model.velocity`: called K times per token with the same shapes,
t a tensor, so one graph serves every step whatever K) and the whole decode step in torch.compile
(inductor, static shapes) before they are run or captured: on CUDA the graphs then replay inductor's
fused kernels (norms, modulations, RoPE and activations fuse; the matmuls stay cuBLAS). The head's
few elementwise SDE ops per step stay eager: compiling the unrolled K-step loop instead would make
compile time grow with K (minutes at K = 50), for a few small kernels. We use inductor's default mode, not
"reduce-overhead": that mode's own CUDA graphs (cudagraph trees) would nest inside our capture, keep a
second memory pool and copy inputs into it, while our StaticCall already owns the static buffers and the
replay. So one switch (cuda_graphs) decides graphs and the other (compile) kernels, and the CPU runs
(tests) the very compiled code the GPU captures. Compiles follow shapes, not runners or tokens: the
head net compiles once per row count, the decode step once per (rows, cache length), and a runner
whose shapes were seen before reuses them (its layers are unrolled: compile time grows with depth).
Dynamo's recompile_limit (8 per function) holds: a ninth shape runs eagerly, with dynamo's warning.
`sampling.attention` (grouped SDPA or flash, base_model/flash_attention.py) is switched around the
whole call, so the prompt pass, the compiled code and the captured graphs all use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from base_model.flash_attention import with_sampling_attention
from base_model.flow import PublishedNoise, counter_noise, num_sde_steps, time_grid
from base_model.model import KVCache, NextStepModel
from base_model.sampler import SampleResult, SamplingConfig, sample_token, token_norm
from base_model.sequence import PromptBatch
from core.errors import ConfigError, UserError

CACHE_LEN_MULTIPLE = 64  # our choice: prompts up to 63 tokens apart share a runner; aligned masks


def use_cuda_graphs(setting: bool | None, device: torch.device) -> bool:
    """sampling.cuda_graphs: None = on for CUDA, off elsewhere; true off CUDA is a config error."""
    if setting and device.type != "cuda":
        raise ConfigError(f"sampling.cuda_graphs: true needs a CUDA device, the model is on {device}")
    return device.type == "cuda" if setting is None else bool(setting)


COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" (same tracing, no code generation: seconds, not minutes)


def compile_static(fn: Callable) -> Callable:
    """torch.compile for a static-shape call: inductor's default mode (see the module docstring),
    dynamic=False so that a second batch shape compiles a second static graph, never a dynamic one."""
    return torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)


def compiled_velocity(model: NextStepModel) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """model.velocity compiled, fed contiguous x: step 0's x^0 is a strided view of the noise, the
    others are not, and a stride is part of a compiled graph's guards (a copy here, not a recompile)."""
    compiled = compile_static(model.velocity)
    return lambda x, t, cond: compiled(x.contiguous(), t, cond)


class StaticCall:
    """fn() reading and writing only tensors it closes over: run eagerly, or captured once as a CUDA
    graph (after warm-up on a side stream, as torch.cuda.graphs requires) and replayed. Returns fn's
    outputs; replayed ones are the graph's own buffers, overwritten by the next replay."""

    def __init__(self, fn: Callable[[], tuple], use_graph: bool, warmup: int = 2):
        self.fn, self.graph, self.out = fn, None, None
        if use_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # a private pool: replays in any order are safe
                self.out = fn()

    def __call__(self) -> tuple:
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


@dataclass(frozen=True)
class RunnerKey:
    rows: int  # R = B or 2B
    num_prompts: int  # B
    cache_len: int
    config: SamplingConfig
    record: bool
    use_graphs: bool
    weights: tuple[int, ...]  # data pointers of every parameter and buffer


class StaticRunner:
    """Device buffers of one (shapes, settings) and the two static calls over them."""

    def __init__(self, model: NextStepModel, key: RunnerKey):
        dev, cfg, c = model.device, model.config, key.config
        self.model, self.key = model, key
        self.grid = time_grid(c.num_head_steps, c.timestep_shift, kind=c.time_grid).tolist()  # floats
        self.num_scored = num_sde_steps(c.time_grid, c.num_head_steps)
        self.cache = KVCache(cfg, key.rows, key.cache_len, model.dtype, dev)
        self.key_valid = torch.ones((key.rows, key.cache_len), dtype=torch.bool, device=dev)
        self.token = torch.zeros((), dtype=torch.int64, device=dev)  # j, the image token being sampled
        self.prompt_len = torch.zeros((), dtype=torch.int64, device=dev)
        self.seeds = torch.zeros(key.num_prompts, dtype=torch.int64, device=dev)
        self.cond = torch.zeros((key.rows, cfg.hidden_size), dtype=model.dtype, device=dev)  # [R, H]
        self.fed = torch.zeros((key.num_prompts, cfg.token_dim), dtype=torch.float32, device=dev)  # [B, 64]
        self.streams = torch.arange(c.num_head_steps + 1, device=dev)  # x^0, then one per head step
        self.noise = (torch.zeros((key.num_prompts, 1 + self.num_scored, cfg.token_dim), device=dev)
                      if c.noise == "published" else None)  # fmt: skip
        # sampling.compile: the head net (one graph, called K times per token) and the whole decode step
        self.velocity = compiled_velocity(model) if c.compile else model.velocity
        self.head = StaticCall(self._head, key.use_graphs)
        self.decode = StaticCall(compile_static(self._decode) if c.compile else self._decode, key.use_graphs)

    def _head(self) -> tuple:
        """K head steps for token j of every sample -> (fed-back token [B, 64], chain | None, log-probs | None)."""
        dim = self.model.config.token_dim
        noise = self.noise if self.noise is not None else counter_noise(self.seeds, self.token, self.streams, dim)
        x, chain, logp = sample_token(self.model, self.cond, self.seeds, 0, self.grid, self.key.config,
                                      self.key.record, noise, self.velocity)  # fmt: skip
        return token_norm(x) if self.key.config.use_norm else x, chain, logp

    def _decode(self) -> tuple:
        """Feed token j back through one backbone step at position P + j -> condition of token j+1 (in self.cond)."""
        model = self.model
        emb = model.image_in_projector(self.fed.to(model.dtype))  # [B, H]
        emb = emb if self.key.rows == self.key.num_prompts else torch.cat([emb, emb], dim=0)  # [R, H]
        pos = (self.prompt_len + self.token).reshape(1)  # [1]
        hidden = model.backbone(emb[:, None], self.key_valid, pos, self.cache)
        self.cond.copy_(model.image_condition(hidden[:, -1], token_index=self.token + 1))
        return (self.cond,)


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its one StaticRunner


def release_runners(model: NextStepModel) -> None:
    """Drop the model's kept runner (its KV cache and graphs), e.g. before timing another path."""
    _RUNNERS.pop(model, None)


def runner_key(
    model: NextStepModel,
    batch: PromptBatch,
    config: SamplingConfig,
    record: bool,
    use_graphs: bool,
    cache_len_multiple: int = CACHE_LEN_MULTIPLE,
) -> RunnerKey:
    """The runner a batch needs: its rows, the cache length (prompt rounded up + image tokens), settings, weights."""
    cache_len = -(-batch.prompt_len // cache_len_multiple) * cache_len_multiple + batch.num_image_tokens
    weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    return RunnerKey(batch.input_ids.shape[0], batch.num_prompts, cache_len, config, record, use_graphs, weights)


def runner_for(model: NextStepModel, key: RunnerKey) -> StaticRunner:
    kept = _RUNNERS.get(model)
    if kept is None or kept.key != key:
        _RUNNERS.pop(model, None)  # free the old cache before allocating the new one
        kept = _RUNNERS[model] = StaticRunner(model, key)
    return kept


@torch.no_grad()
@with_sampling_attention
def sample_tokens_static(
    model: NextStepModel,
    batch: PromptBatch,
    seeds: torch.Tensor,
    config: SamplingConfig,
    record_chains: bool = False,
    progress: bool = False,
    prefix_tokens: torch.Tensor | None = None,
    use_graphs: bool | None = None,
    cache_len_multiple: int = CACHE_LEN_MULTIPLE,
) -> SampleResult:
    """`sampler.sample_tokens` with static shapes: same arguments and result (seeds [B] int64,
    prefix_tokens [B, m, 64]). use_graphs None follows config.cuda_graphs; False runs the static
    functions eagerly (what the graphs capture, for comparisons). config.attention is used throughout."""
    if prefix_tokens is not None and record_chains:
        raise ValueError("a continuation of given prefix tokens records no chains")
    if batch.image_prefix is not None:
        raise ValueError("Self-CoT batches run the reference loop (sampler.sample_tokens), not the static one")
    device = model.device
    use_graphs = use_cuda_graphs(config.cuda_graphs if use_graphs is None else use_graphs, device)
    batch, seeds = batch.to(device), seeds.to(device)
    if config.uses_guidance and not batch.has_uncond:
        raise ValueError("cfg_scale != 1 needs a prompt batch built with_uncond=True")
    prompt_len, num_tokens = batch.prompt_len, batch.num_image_tokens
    if model.config.use_gen_pos_embed and num_tokens > model.gen_pos_embed.shape[1]:
        raise UserError(f"use_gen_pos_embed: the checkpoint's position table covers {model.gen_pos_embed.shape[1]} "
                        f"image tokens, this image needs {num_tokens}: sample a smaller one")  # fmt: skip
    run = runner_for(model, runner_key(model, batch, config, record_chains, use_graphs, cache_len_multiple))
    published = PublishedNoise(seeds, model.config.token_dim, device) if config.noise == "published" else None

    # prompt pass (eager: its length varies) into the runner's cache, then the per-token calls
    run.key_valid.fill_(True)
    run.key_valid[:, :prompt_len] = batch.attention_mask
    run.prompt_len.fill_(prompt_len)
    run.seeds.copy_(seeds)
    positions = torch.arange(prompt_len, device=device)
    hidden = model.backbone(model.embed(batch.input_ids), run.key_valid, positions, run.cache)
    run.cond.copy_(model.image_condition(hidden[:, -1], token_index=0))

    tokens, chains, logps = [], [], []
    num_given = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    steps = tqdm(range(num_tokens), desc="image tokens", leave=False) if progress else range(num_tokens)
    for j in steps:
        run.token.fill_(j)  # a fill kernel: no host sync
        if j < num_given:
            y = prefix_tokens[:, j].to(device=device, dtype=torch.float32)  # [B, 64]
        else:
            if published is not None:
                run.noise.copy_(published.draw(1 + run.num_scored))
            y, chain, logp = run.head()
            y = y.clone()  # a replay's outputs are overwritten by the next replay
            if record_chains:
                chains.append(chain.clone())
                logps.append(logp.clone())
        tokens.append(y)
        if j == num_tokens - 1:
            break
        run.fed.copy_(y)
        run.decode()
    return SampleResult(
        tokens=torch.stack(tokens, dim=1),
        chains=torch.stack(chains, dim=1) if record_chains else None,
        log_probs=torch.stack(logps, dim=1) if record_chains else None,
    )
