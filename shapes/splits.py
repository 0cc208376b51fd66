"""Deterministic splits of the shapes world and their files.

Captions (specs) are partitioned once, per kind, into an `eval` pool and a `train` pool, so the
held-out evaluation prompts never appear in the SFT data or the preference prompts. Pre-training
(the base model's "world knowledge") draws from every spec, with a configured share of captions made
wrong (`corrupt`: a colour or the relation) so that alignment has room to improve. Each split draws
its layouts from its own random stream, so images of different splits never share a seed.

Files: Parquet (`caption`, `image` PNG bytes: the SFT job's format; pre-training rows also carry the
true caption and a `noisy` flag) and GenEval metadata jsonl (`prompt`, `tag`, `include`, `exclude`;
the prompt files of build-prefs / evaluate and the rule reward's metadata). The `cot` split (clean
captions, train pool) also carries each image's `plan` (scenes.plan): the reasoning column of Self-CoT SFT.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core.errors import ConfigError
from shapes.scenes import (
    COLORS,
    KINDS,
    SHAPES,
    Geometry,
    Scene,
    Spec,
    all_specs,
    caption,
    corrupt,
    layout,
    plan,
    record,
    render,
)

SPLIT_STREAMS = {"partition": 0, "pretrain": 1, "sft": 2, "prefs": 3, "eval": 4, "noise": 5, "heldout": 6, "cot": 7}


@dataclass
class WorldDataConfig:
    """The shapes world: palette subset, kind mix, split sizes, caption noise."""

    seed: int = 0
    image_size: int = 64
    colors: list[str] = field(default_factory=lambda: list(COLORS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    kind_weights: dict[str, float] = field(default_factory=lambda: {"single": 0.25, "counting": 0.25, "position": 0.5})
    eval_fraction: float = 0.2  # share of each kind's captions held out for evaluation
    num_pretrain: int = 6000  # images
    num_sft: int = 1000  # images (clean captions, train-pool specs)
    num_prefs: int = 128  # prompts (train pool, distinct)
    num_eval: int = 64  # prompts (eval pool, distinct)
    num_heldout: int = 256  # images (clean captions, eval-pool specs): drift guards such as select's FM loss
    num_cot: int = 4000  # images (clean captions, train-pool specs) with their plans: Self-CoT SFT
    noise_share: float = 0.3  # share of pre-training captions that are wrong

    def validate(self, where: str = "data") -> None:
        unknown = sorted(set(self.colors) - set(COLORS)) + sorted(set(self.shapes) - set(SHAPES))
        if unknown:
            raise ConfigError(f"{where}.colors/shapes: unknown name '{unknown[0]}'")
        if len(self.colors) < 2 or len(self.shapes) < 2:
            raise ConfigError(f"{where}.colors: need at least two colours and two shapes")
        bad = sorted(set(self.kind_weights) - set(KINDS))
        if bad or any(w < 0 for w in self.kind_weights.values()) or sum(self.kind_weights.values()) <= 0:
            raise ConfigError(f"{where}.kind_weights: expected non-negative weights for {', '.join(KINDS)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"{where}.eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.noise_share <= 1.0:
            raise ConfigError(f"{where}.noise_share: must be in [0, 1], got {self.noise_share}")
        if self.image_size != 64:
            raise ConfigError(f"{where}.image_size: the layouts are drawn for 64, got {self.image_size}")
        for name in ("num_pretrain", "num_sft", "num_prefs", "num_eval", "num_heldout", "num_cot"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Example:
    """One row of a split: the caption shown, the scene drawn (its spec is the truth), noisy flag."""

    caption: str
    scene: Scene | None  # None for prompt-only splits (prefs, eval)
    spec: Spec  # what `caption` says
    noisy: bool = False


def rng_for(config: WorldDataConfig, stream: str) -> np.random.Generator:
    """Independent random stream of one split."""
    return np.random.default_rng([config.seed, SPLIT_STREAMS[stream]])


def partition(config: WorldDataConfig) -> dict[str, dict[str, list[Spec]]]:
    """pool ('train' | 'eval') -> kind -> specs; each kind keeps at least one spec per pool."""
    rng = rng_for(config, "partition")
    pools: dict[str, dict[str, list[Spec]]] = {"train": {}, "eval": {}}
    for kind in KINDS:
        specs = [s for s in all_specs(config.colors, config.shapes) if s.kind == kind]
        order = [specs[i] for i in rng.permutation(len(specs))]
        n_eval = min(max(1, round(config.eval_fraction * len(specs))), len(specs) - 1)
        pools["eval"][kind], pools["train"][kind] = order[:n_eval], order[n_eval:]
    return pools


def _kinds(config: WorldDataConfig) -> tuple[list[str], np.ndarray]:
    kinds = [k for k in KINDS if config.kind_weights.get(k, 0.0) > 0]
    weights = np.array([config.kind_weights[k] for k in kinds], dtype=np.float64)
    return kinds, weights / weights.sum()


def draw_specs(pool: dict[str, list[Spec]], config: WorldDataConfig, rng: np.random.Generator, n: int) -> list[Spec]:
    """n specs: kind by kind_weights, then uniform within the kind (with repetition)."""
    kinds, probs = _kinds(config)
    picks = rng.choice(len(kinds), size=n, p=probs)
    return [pool[kinds[k]][int(rng.integers(len(pool[kinds[k]])))] for k in picks]


def distinct_specs(
    pool: dict[str, list[Spec]], config: WorldDataConfig, rng: np.random.Generator, n: int
) -> list[Spec]:
    """Up to n distinct specs in kind_weights proportions (a kind runs out -> the others fill in)."""
    kinds, probs = _kinds(config)
    queues = {k: [pool[k][i] for i in rng.permutation(len(pool[k]))] for k in kinds}
    quota = {k: int(round(p * n)) for k, p in zip(kinds, probs)}
    out = [s for k in kinds for s in queues[k][: quota[k]]]
    rest = [s for k in kinds for s in queues[k][quota[k] :]]
    out += [rest[i] for i in rng.permutation(len(rest))[: max(0, n - len(out))]]
    return out[:n]


def image_split(config: WorldDataConfig, name: str) -> list[Example]:
    """'pretrain' (all specs, noisy captions), 'sft' or 'cot' (train pool, clean captions) or 'heldout' (eval
    pool, clean captions; never trained on): captioned scenes."""
    rng = rng_for(config, name)
    geo = Geometry(image_size=config.image_size)
    if name == "pretrain":
        everything = {k: [s for p in partition(config).values() for s in p[k]] for k in KINDS}
        specs = draw_specs(everything, config, rng, config.num_pretrain)
    elif name == "sft":
        specs = draw_specs(partition(config)["train"], config, rng, config.num_sft)
    elif name == "cot":
        specs = draw_specs(partition(config)["train"], config, rng, config.num_cot)
    elif name == "heldout":
        specs = draw_specs(partition(config)["eval"], config, rng, config.num_heldout)
    else:
        raise ValueError(f"'{name}' is not an image split (pretrain, sft, cot, heldout)")
    scenes = [layout(s, rng, geo) for s in specs]
    noise_rng = rng_for(config, "noise")
    noisy = noisy_rows(len(scenes), config.noise_share if name == "pretrain" else 0.0, noise_rng)
    out = []
    for i, scene in enumerate(scenes):
        said = corrupt(scene.spec, noise_rng, config.colors) if i in noisy else scene.spec
        out.append(Example(caption(said), scene, said, i in noisy))
    return out


def noisy_rows(n: int, share: float, rng: np.random.Generator) -> set[int]:
    """Exactly round(share * n) row indices, drawn uniformly."""
    return {int(i) for i in rng.permutation(n)[: int(round(share * n))]}


def prompt_split(config: WorldDataConfig, name: str) -> list[Example]:
    """'prefs' (train pool) or 'eval' (held-out pool): distinct prompts, no images."""
    pools = partition(config)
    if name == "prefs":
        specs = distinct_specs(pools["train"], config, rng_for(config, name), config.num_prefs)
    elif name == "eval":
        specs = distinct_specs(pools["eval"], config, rng_for(config, name), config.num_eval)
    else:
        raise ValueError(f"'{name}' is not a prompt split (prefs, eval)")
    return [Example(caption(s), None, s) for s in specs]


# ---------------------------------------------------------------- writers


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(examples: list[Example], path: str | Path, image_size: int = 64, plans: bool = False) -> Path:
    """Rows caption, image (PNG bytes), true_caption, noisy (+ plan: each scene's `plan`) -> Parquet (what
    `nsalign sft` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {
        "caption": [e.caption for e in examples],
        "image": [png_bytes(render(e.scene, image_size)) for e in examples],
        "true_caption": [caption(e.scene.spec) for e in examples],
        "noisy": [e.noisy for e in examples],
    }  # fmt: skip
    if plans:
        columns["plan"] = [plan(e.scene, image_size) for e in examples]
    pq.write_table(pa.table(columns), path)
    return path


def write_metadata(specs: list[Spec], path: str | Path) -> Path:
    """GenEval metadata jsonl, one record per spec (field `prompt` is the caption)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record(s)) + "\n" for s in specs), encoding="utf-8")
    return path
