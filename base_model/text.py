"""Self-CoT text: the reasoning the model writes before its image, as pure functions.

A Self-CoT sample is  [caption wrapped in the CoT template] [reasoning text] <|image_area|> "h*w"
<|begin_of_image|> [image tokens] <|end_of_image|>: the published layout with the model's own text in
front of the image block. The model writes the reasoning token by token from `lm_head` and stops by
emitting a stop token (<|image_area|> or <|begin_of_image|>) or at `max_text_tokens`; the sampler then
appends the image prefix itself, so the image block is always the published one.

Log-probs are the model's own distribution (softmax of the logits, temperature 1, no top-p): what
DPO and RL need, whatever sampling distribution drew the token. A reasoning of n tokens scores
    log pi(text) = sum_{k<n} log pi(w_k | ...) + [stopped] log(pi(<|image_area|>) + pi(<|begin_of_image|>))
where the last term is the stop event at position n (either stop token ends the text the same way),
absent when the text was cut at max_text_tokens. `text_step` draws a token and `text_log_prob` scores
it; the sampler and the teacher-forced re-scoring call the same `text_log_prob`.

Draws are counter-based (flow.counter_uniform of (seed, text position)): a sample's text depends on its
own seed only, never on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from base_model.flow import counter_uniform
from core.errors import ConfigError

CAPTION_FIELD = "{caption}"
# Our default, not published (NextStep-1 does not release its Self-CoT prompt): make the model plan what
# GenEval-style rewards check before it draws.
DEFAULT_COT_TEMPLATE = (
    "{caption}\nBefore drawing, reason briefly about the objects, their counts, colours and positions. "
    "Then draw the image.\n"
)
TEXT_SALT = 0x5EED7E47  # keys the text draws apart from the image noise


@dataclass(frozen=True)
class CotConfig:
    """How the reasoning is written (used when `SamplingConfig.self_cot` is true)."""

    template: str = DEFAULT_COT_TEMPLATE  # must contain {caption} once
    max_text_tokens: int = 256  # reasoning tokens at most; the image prefix is forced after them
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps every token

    def validate(self, where: str) -> None:
        if self.template.count(CAPTION_FIELD) != 1:
            raise ConfigError(f"{where}.template: must contain {CAPTION_FIELD} exactly once")
        if self.max_text_tokens < 1:
            raise ConfigError(f"{where}.max_text_tokens: must be >= 1, got {self.max_text_tokens}")
        if not self.temperature >= 0.0:
            raise ConfigError(f"{where}.temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p: must be in (0, 1], got {self.top_p}")

    @property
    def text_tokens(self) -> int:
        """Positions the template and the reasoning add to a sequence at most: the template's UTF-8 bytes bound
        its tokens (byte-level BPE never needs more), +1 for a BOS, + max_text_tokens."""
        before, after = self.template_parts
        return len(before.encode()) + len(after.encode()) + 1 + self.max_text_tokens

    @property
    def template_parts(self) -> tuple[str, str]:
        """(text before {caption}, text after it)."""
        before, after = self.template.split(CAPTION_FIELD)
        return before, after


@dataclass
class TextSample:
    """The reasoning of B samples, left-aligned."""

    ids: torch.Tensor  # [B, N] long; row i's first lengths[i] entries are its text, the rest 0
    lengths: torch.Tensor  # [B] long
    stopped: torch.Tensor  # [B] bool: ended by a stop token (False: cut at max_text_tokens)
    log_probs: torch.Tensor  # [B, N+1] fp32: token k at k < length, the stop event at length, 0 elsewhere

    def rows(self) -> list[list[int]]:
        """Each row's text token ids."""
        return [r[:n] for r, n in zip(self.ids.tolist(), self.lengths.tolist())]

    @classmethod
    def concat(cls, parts: list[TextSample]) -> TextSample:
        """Samples of several batches -> one, right-padded to the longest (with 0: ids and log-probs)."""
        n = max(p.ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, width: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        return cls(ids=torch.cat([pad(p.ids, n) for p in parts]), lengths=torch.cat([p.lengths for p in parts]),
                   stopped=torch.cat([p.stopped for p in parts]),
                   log_probs=torch.cat([pad(p.log_probs, n + 1) for p in parts]))  # fmt: skip

    def select(self, index: torch.Tensor) -> TextSample:
        """Rows `index` [b] long."""
        return TextSample(self.ids[index], self.lengths[index], self.stopped[index], self.log_probs[index])

    def to(self, device) -> TextSample:
        return TextSample(self.ids.to(device), self.lengths.to(device), self.stopped.to(device),
                          self.log_probs.to(device))  # fmt: skip


def text_log_prob(log_pi: torch.Tensor, tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Score of `tokens` under the model: log_pi [N, V] log-softmax of the logits, tokens [N] long ->
    [N] fp32; a stop token scores the stop event log(sum of the stop tokens' probabilities)."""
    is_stop = torch.isin(tokens, stop_ids)
    stop = torch.logsumexp(log_pi[:, stop_ids], dim=-1)  # [N]
    return torch.where(is_stop, stop, log_pi.gather(1, tokens[:, None])[:, 0])


def text_step(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    config: CotConfig,
    stop_ids: torch.Tensor,
    banned_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one text token per row and score it.

    logits [B, V]; uniforms [B] in (0, 1) -> (token [B] long, log-prob [B] fp32 under the model, is_stop [B]).
    The draw: temperature, then the smallest set of most likely tokens whose mass reaches top_p (ties
    broken by token id), then inverse-CDF with the row's uniform; temperature 0 takes the argmax.
    `banned_ids` (padding, <|end_of_image|>, the image placeholder) are never drawn.
    """
    logits = logits.float()
    log_pi = torch.log_softmax(logits, dim=-1)
    allowed = logits.index_fill(1, banned_ids, float("-inf"))
    if config.temperature == 0.0:
        token = allowed.argmax(dim=-1)
    else:
        probs = torch.softmax(allowed / config.temperature, dim=-1)
        p_sorted, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [B, V]
        keep = (p_sorted.cumsum(-1) - p_sorted) < config.top_p  # mass before this token below top_p
        cdf = (p_sorted * keep).cumsum(-1)  # [B, V]
        target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, target).clamp_max(cdf.shape[1] - 1)  # [B, 1]
        token = order.gather(1, pick)[:, 0]
    return token, text_log_prob(log_pi, token, stop_ids), torch.isin(token, stop_ids)


def text_uniforms(seeds: torch.Tensor, position: int) -> torch.Tensor:
    """The uniforms [B] of text position `position` of samples with `seeds` [B]."""
    return counter_uniform(seeds, position, TEXT_SALT)
