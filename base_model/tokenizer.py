"""Text tokenizers: the published Qwen2.5 tokenizer (loaded from a checkpoint directory) and a tiny
byte-level tokenizer built in-process for tests and CPU presets. Both are `PreTrainedTokenizerFast`
with the NextStep special tokens, so every code path downstream is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import CheckpointError

PAD_TOKEN = "[PAD]"
IMAGE_AREA_TOKEN = "<|image_area|>"
BOI_TOKEN = "<|begin_of_image|>"
EOI_TOKEN = "<|end_of_image|>"
PLACEHOLDER_TOKEN = "<|image_placeholder|>"
SPECIAL_TOKENS = [PAD_TOKEN, IMAGE_AREA_TOKEN, BOI_TOKEN, EOI_TOKEN, PLACEHOLDER_TOKEN]


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    image_area: int
    boi: int
    eoi: int
    placeholder: int


def build_tiny_tokenizer():
    """A 256-symbol byte-level tokenizer (no merges, no BOS) plus the five NextStep special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left")
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tok


def load_tokenizer(directory: str | Path):
    """Load the tokenizer files of a checkpoint directory (offline), left padding, no EOS appended."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise CheckpointError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, padding_side="left")
    except Exception as e:  # transformers raises many types for unreadable files
        raise CheckpointError(f"{directory}: cannot load tokenizer: {e}") from None
    if hasattr(tok, "add_eos_token"):
        tok.add_eos_token = False
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    return tok


def special_ids(tokenizer, config=None) -> SpecialIds:
    """Resolve the special-token ids from the tokenizer and check them against the model config."""
    ids = {}
    for name, token in [
        ("pad", PAD_TOKEN), ("image_area", IMAGE_AREA_TOKEN), ("boi", BOI_TOKEN),
        ("eoi", EOI_TOKEN), ("placeholder", PLACEHOLDER_TOKEN),
    ]:  # fmt: skip
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise CheckpointError(f"tokenizer has no special token {token}")
        ids[name] = int(tid)
    out = SpecialIds(**ids)
    if config is not None:
        for field, config_name in [("boi", "boi"), ("eoi", "eoi"), ("placeholder", "image_placeholder_id")]:
            want = getattr(config, config_name, None)
            if want is not None and want != getattr(out, field):
                raise CheckpointError(
                    f"config.json {config_name}={want} but the tokenizer maps it to {getattr(out, field)}"
                )
        if max(ids.values()) >= config.vocab_size:
            raise CheckpointError(f"special token id {max(ids.values())} >= vocab_size {config.vocab_size}")
    return out
