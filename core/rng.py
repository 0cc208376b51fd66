"""Every global random generator (python, numpy, torch CPU and CUDA) as plain JSON, saved with each
checkpoint so a resumed run draws what an uninterrupted one would. Reading it back runs no code."""

from __future__ import annotations

import random

import numpy as np
import torch

RNG_FORMAT = 1


def capture_rng() -> dict:
    """Every global generator a job draws from, as plain JSON values (so reading it back runs no code):
    python's Mersenne Twister (version, 624 words + position, cached gauss), numpy's legacy RandomState
    (MT19937 keys, position, cached gaussian), torch's CPU generator and each CUDA device's (bytes, as hex)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "format": RNG_FORMAT,
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
        "cuda": [s.cpu().numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }  # fmt: skip


def _words(value: object, count: int, what: str) -> list[int]:
    """`count` ints in [0, 2**32) (Mersenne Twister words), else ValueError naming `what`."""
    if not (isinstance(value, list) and len(value) == count):
        raise ValueError(f"{what}: expected a list of {count} integers")
    if not all(type(v) is int and 0 <= v < 2**32 for v in value):
        raise ValueError(f"{what}: expected integers in [0, 2**32)")
    return value


def _bytes(value: object, what: str) -> torch.Tensor:
    """A hex string -> uint8 tensor, else ValueError naming `what`."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a hex string")
    return torch.tensor(list(bytes.fromhex(value)), dtype=torch.uint8)


def restore_rng(state: dict) -> None:
    """Set every generator from a `capture_rng()` dict (or its JSON read back). Every field is checked first,
    so a malformed state raises ValueError naming the field and changes no generator."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ValueError(f"format: expected {RNG_FORMAT}")
    py, npy = state.get("python"), state.get("numpy")
    if not isinstance(py, dict) or not isinstance(npy, dict):
        raise ValueError("expected 'python' and 'numpy' sections")
    internal = _words(py.get("state"), 625, "python.state")  # 624 words + the position
    if internal[-1] > 624:
        raise ValueError("python.state: position beyond 624")
    gauss = py.get("gauss_next")
    if type(py.get("version")) is not int or not (gauss is None or type(gauss) is float):
        raise ValueError("python: expected an int version and a float or null gauss_next")
    keys = _words(npy.get("keys"), 624, "numpy.keys")
    pos, has_gauss, cached = npy.get("pos"), npy.get("has_gauss"), npy.get("cached_gaussian")
    if npy.get("bit_generator") != "MT19937" or type(pos) is not int or not 0 <= pos <= 624:
        raise ValueError("numpy: expected bit_generator MT19937 and pos in [0, 624]")
    if has_gauss not in (0, 1) or type(cached) is not float:
        raise ValueError("numpy: expected has_gauss 0 or 1 and a float cached_gaussian")
    cpu = _bytes(state.get("torch"), "torch")
    if cpu.numel() != torch.get_rng_state().numel():
        raise ValueError(f"torch: expected {torch.get_rng_state().numel()} bytes, got {cpu.numel()}")
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list):
        raise ValueError("cuda: expected a list")
    cuda = [_bytes(s, f"cuda[{i}]") for i, s in enumerate(cuda)]
    random.setstate((py["version"], tuple(internal), gauss))
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def sample_order(num_items: int, seed: int, position: int, count: int) -> list[int]:
    """Items `position .. position+count` of an endless stream of seeded epoch permutations."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + count - len(out)].tolist())
    return out
