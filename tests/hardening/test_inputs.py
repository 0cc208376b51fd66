"""Input validation (issue 18, item 7): prompt length, impossible sizes, YAML and Parquet errors,
decompression bombs, unwritable or full disks, refused settings. Each bad input ends as one line on
stderr with exit 2 and leaves nothing behind (tests/hardening/helpers.py)."""

from __future__ import annotations

import dataclasses
import errno
import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from base_model.sequence import (
    DEFAULT_MAX_PROMPT_TOKENS,
    append_image_block,
    build_prompt_batch,
    check_sequence_fits,
    positions_needed,
    truncation_note,
)
from base_model.tokenizer import build_tiny_tokenizer, special_ids
from core.errors import ConfigError, UserError
from core.schema import yaml_error_line
from jobs.cli import main
from tests.hardening.helpers import BadInput, patch_everywhere, run_bad_input

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# -- prompt length ------------------------------------------------------------------------------


def test_a_50000_character_prompt_keeps_its_first_max_prompt_tokens(tok):
    """Byte-level tiny tokenizer, no BOS: 50,000 ASCII characters are 50,000 tokens. The row keeps the
    first 512 and adds <|image_area|> "4*4" <|begin_of_image|> = 5 tokens at 64 px: 517 columns."""
    ids = special_ids(tok)
    text = "abcdefghij" * 5000
    batch = build_prompt_batch(tok, ids, [text], (64, 64), with_uncond=True)
    assert batch.input_ids.shape == (2, 517)
    assert batch.input_ids[0, :512].tolist() == tok(text[:512])["input_ids"]
    assert batch.attention_mask[1].sum() == 5  # the empty negative prompt: prefix only, left padded


def test_a_50000_character_prompt_samples_with_a_small_mask(monkeypatch):
    """Before the cap this prompt asked for a [2, 1, 52005, 52005] bool mask (5.4 GB) and ran past the tiny
    preset's 4096 positions. Now the largest mask is [2, 1, 517, 533]: 512 + 5 prompt columns, and the
    KV cache preallocated for them + 16 image tokens."""
    import base_model.model
    from base_model.checkpoint import build_random
    from base_model.generate import generate_images
    from base_model.sampler import SamplingConfig

    shapes = []
    real = base_model.model.attention_mask_4d

    def spy(key_valid, query_positions):
        mask = real(key_valid, query_positions)
        shapes.append(tuple(mask.shape))
        return mask

    monkeypatch.setattr(base_model.model, "attention_mask_4d", spy)
    bundle = build_random("tiny", seed=0)
    images = generate_images(bundle, ["a red circle " * 4000], [0], SamplingConfig(image_size=64, num_head_steps=2))
    assert images.shape == (1, 3, 64, 64)
    assert shapes[0] == (2, 1, 517, 533)  # the prompt pass: 517 queries over the cache's 517 + 16 keys
    assert max(q * k for _, _, q, k in shapes) == 517 * 533


def test_positions_needed_is_exact_for_the_byte_tokenizer(tok):
    """4074 caption tokens + 5 prefix + 16 image tokens + <|end_of_image|> = 4096, the tiny preset's limit."""
    ids = special_ids(tok)
    assert positions_needed(4074, (64, 64)) == 4096
    assert positions_needed(512, (512, 512)) == 512 + 1 + len("32*32") + 1 + 1024 + 1  # 1544
    batch = build_prompt_batch(tok, ids, ["x" * 9000], (64, 64), False, max_prompt_tokens=4074)
    input_ids, _ = append_image_block(batch, ids)
    assert input_ids.shape[1] == 4096


def test_impossible_sizes_are_refused_naming_the_key():
    check_sequence_fits(4074, (64, 64), 4096, "sampling.max_prompt_tokens")  # exactly full: fine
    with pytest.raises(ConfigError, match=r"sampling.max_prompt_tokens: 4075 prompt tokens .* 4097 positions > "
                                          r"the model's 4096; use <= 4074"):  # fmt: skip
        check_sequence_fits(4075, (64, 64), 4096, "sampling.max_prompt_tokens")
    with pytest.raises(ConfigError, match="must be >= 1"):
        check_sequence_fits(0, (64, 64), None, "max_prompt_tokens")


def test_truncation_is_reported_once_with_a_count(tok):
    note = truncation_note("grpo", "sampling.max_prompt_tokens", tok, ["ab", "x" * 600, "y" * 700], 512)
    assert note == ("grpo: 2 of 3 prompts are longer than sampling.max_prompt_tokens=512 tokens (longest 700) "
                    "and are truncated to their first 512 tokens")  # fmt: skip
    assert truncation_note("grpo", "k", tok, ["ab", "x" * 512], 512) is None


def test_grpo_rescores_a_truncated_prompt_on_the_rows_it_was_sampled_with():
    """The cap travels in the rollout's SamplingConfig: re-scoring uses it (ratio 1); re-scoring the same
    chains with another cap gives other log-probs, so a disagreement would show."""
    from alignment.losses import trained_mask
    from alignment.objectives import grpo_objective
    from base_model.sampler import SamplingConfig
    from rollout.prompts import Prompt, prompt_id
    from rollout.worker import RolloutWorker

    text = "a red circle on a green square " * 20  # 620 tokens
    w = RolloutWorker("tiny", SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=3, max_prompt_tokens=8))
    batch = w.rollout([Prompt(prompt_id(text), text)], 2, record_chains=True)
    args = (w.bundle.model, None, w.bundle.tokenizer, w.bundle.ids)
    rest = (torch.zeros(2), trained_mask("full", 16, 3).float(), 1e-4, 0.0)
    _, same = grpo_objective(*args, batch, *rest)
    other = dataclasses.replace(batch, sampling=dataclasses.replace(batch.sampling, max_prompt_tokens=512))
    _, differ = grpo_objective(*args, other, *rest)
    assert same["grpo/logprob_diff"] < 2e-3
    assert differ["grpo/logprob_diff"] > 100 * max(same["grpo/logprob_diff"], 1e-6)


def test_generate_truncates_a_long_prompt_and_says_so_once(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["generate", "--checkpoint", "tiny", "--prompt", "x" * 10_000, "--steps", "2", "--out", str(out)])
    assert code == 0 and out.is_file()
    stdout = capsys.readouterr().out
    assert stdout.count("are truncated") == 1
    limit = DEFAULT_MAX_PROMPT_TOKENS
    assert f"1 of 1 prompts are longer than --max-prompt-tokens={limit} tokens (longest 10000)" in stdout


# -- YAML ---------------------------------------------------------------------------------------


def test_yaml_error_is_one_line_with_line_and_column():
    with pytest.raises(yaml.YAMLError) as e:
        yaml.safe_load("a: 1\nb: [1, 2\nc: 3\n")
    assert yaml_error_line("cfg.yaml", e.value) == (
        "cfg.yaml:3:2: expected ',' or ']', but got ':' (while parsing a flow sequence started at line 2)"
    )


# -- files for the table ------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 1-bit pixels and holds none: PIL checks the size on
    open, before decoding, so this is all a decompression bomb needs to show."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _pairs_table(**replace) -> pa.Table:
    """One preference row with the columns `nsalign dpo` reads; `replace` swaps or drops (None) columns."""
    cols = {"prompt": pa.array(["a cat"]), "chosen_tokens": pa.array([[[0.0] * 64] * 16]),
            "rejected_tokens": pa.array([[[0.0] * 64] * 16]), "chosen_reward": pa.array([1.0]),
            "rejected_reward": pa.array([0.0]), "sampling": pa.array(['{"image_size": 64}'])}  # fmt: skip
    cols.update(replace)
    return pa.table({k: v for k, v in cols.items() if v is not None})


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Every bad file of the table, written before the run (the watched dirs only guard new ones)."""
    d = tmp_path / "in"
    d.mkdir()
    f = {}
    f["bad_yaml"] = d / "bad.yaml"
    f["bad_yaml"].write_text("model: tiny\ndata: {path: x.parquet\nsteps: 2\n")
    f["prompts"] = d / "prompts.txt"
    f["prompts"].write_text("a red circle\na blue square\n")
    f["no_prompt_col"] = d / "noprompt.parquet"
    pq.write_table(pa.table({"text": ["a cat"]}), f["no_prompt_col"])
    f["int_prompt_col"] = d / "intprompt.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), f["int_prompt_col"])
    f["not_parquet"] = d / "prompts.parquet"
    f["not_parquet"].write_text("a cat\na dog\n")
    f["sft_no_caption"] = d / "nocap.parquet"
    pq.write_table(pa.table({"text": ["a cat"], "image": [_png()]}), f["sft_no_caption"])
    f["sft_image_str"] = d / "imgstr.parquet"
    pq.write_table(pa.table({"caption": ["a cat"], "image": ["not bytes"]}), f["sft_image_str"])
    f["sft_bomb"] = d / "bomb.parquet"  # row 1 declares 20000 x 20000: PIL's DecompressionBombError
    pq.write_table(pa.table({"caption": ["a", "b"], "image": [_png(), _png_header(20000, 20000)]}), f["sft_bomb"])
    f["tar_warn_bomb"] = _tar(
        d / "warn.tar", {"s0.png": _png(), "s0.txt": b"a", "s1.png": _png_header(10000, 10000), "s1.txt": b"b"}
    )  # fmt: skip  (PIL only warns at 100 MP)
    f["tar_over_cap"] = _tar(d / "cap.tar", {"s0.png": _png_header(6000, 6000), "s0.txt": b"a"})  # 36 MP > 32 MiP
    f["prefs_missing"] = d / "missing" / "data"
    f["prefs_missing"].mkdir(parents=True)
    pq.write_table(_pairs_table(chosen_tokens=None), f["prefs_missing"] / "shard-000000.parquet")
    f["prefs_mixed"] = d / "mixed" / "data"
    f["prefs_mixed"].mkdir(parents=True)
    pq.write_table(_pairs_table(), f["prefs_mixed"] / "shard-000000.parquet")
    pq.write_table(_pairs_table(chosen_reward=pa.array(["high"])), f["prefs_mixed"] / "shard-000001.parquet")
    f["prefs_junk"] = d / "junk" / "data"
    f["prefs_junk"].mkdir(parents=True)
    (f["prefs_junk"] / "shard-000000.parquet").write_bytes(b"PAR1 not really")
    f["a_file"] = d / "a_file"
    f["a_file"].write_text("")
    return f


def _cases(f: dict[str, Path], runs: Path) -> list[BadInput]:
    prefs = ["build-prefs", str(CONFIGS / "prefs" / "tiny.yaml"), f"out_dir={runs / 'prefs'}",
             f"prompts.path={f['prompts']}", "rollout.pool.kind=local"]  # fmt: skip
    sft = ["sft", str(CONFIGS / "sft" / "tiny.yaml"), f"runs_root={runs}"]
    dpo = ["dpo", str(CONFIGS / "dpo" / "tiny.yaml"), f"runs_root={runs}"]
    gen = ["generate", "--checkpoint", "tiny", "--prompt", "a cat", "--steps", "2", "--out", str(runs / "g.png")]
    w = [runs]
    return [
        # configs
        BadInput("yaml syntax", ["sft", str(f["bad_yaml"])], f"{f['bad_yaml']}:3:6: expected ',' or '}}'", w),
        BadInput("override list", [*sft, "steps=[1,"], "override 'steps=[1,':1:4:", w),
        BadInput("override empty key", [*sft, "=3"], "override '=3': empty key", w),
        BadInput("prompts.limit 0", [*prefs, "prompts.limit=0"], "prompts.limit: must be >= 1 or null", w),
        BadInput("cfg below 1", [*prefs, "sampling.cfg_scale=0.5"], "sampling.cfg_scale: must be >= 1", w),
        BadInput("cfg 0", [*prefs, "sampling.cfg_scale=0"], "sampling.cfg_scale: must be >= 1", w),
        BadInput("generate cfg", [*gen, "--cfg", "0.9"], "generate.cfg_scale: must be >= 1", w),
        BadInput("max tokens 0", [*prefs, "sampling.max_prompt_tokens=0"], "max_prompt_tokens: must be >= 1", w),
        BadInput("past 4096", [*prefs, "sampling.max_prompt_tokens=4075"], "4097 positions > the model's 4096", w),
        BadInput("sft past 4096", [*sft, "max_prompt_tokens=5000"], "max_prompt_tokens: 5000 prompt tokens", w),
        BadInput("generate past 4096", [*gen, "--max-prompt-tokens", "4075"], "--max-prompt-tokens: 4075", w),
        # prompt files
        BadInput(
            "prompts no column",
            [*prefs, f"prompts.path={f['no_prompt_col']}"],
            f"{f['no_prompt_col']}: no column 'prompt' (columns: text)",
            w,
        ),
        BadInput(
            "prompts int column",
            [*prefs, f"prompts.path={f['int_prompt_col']}"],
            "column 'prompt' is int64, expected string",
            w,
        ),
        BadInput(
            "prompts not parquet",
            [*prefs, f"prompts.path={f['not_parquet']}"],
            f"{f['not_parquet']}: not a readable prompt file",
            w,
        ),
        # SFT data
        BadInput("sft no caption", [*sft, f"data.path={f['sft_no_caption']}"], "no column 'caption' (columns: text", w),
        BadInput("sft image str", [*sft, f"data.path={f['sft_image_str']}"], "'image' is string, expected binary", w),
        BadInput("sft bomb", [*sft, f"data.path={f['sft_bomb']}"], "row 1: refused as a decompression bomb", w),
        BadInput(
            "tar warn bomb", [*sft, f"data.path={f['tar_warn_bomb']}"], "sample 's1': refused as a decompression", w
        ),
        BadInput("tar over cap", [*sft, f"data.path={f['tar_over_cap']}"], "6000x6000 pixels is over the cap", w),
        # preference shards
        BadInput("prefs column", [*dpo, f"data.path={f['prefs_missing'].parent}"], "no column 'chosen_tokens'", w),
        BadInput(
            "prefs mixed",
            [*dpo, f"data.path={f['prefs_mixed'].parent}"],
            "shard-000001.parquet: column 'chosen_reward' is string",
            w,
        ),
        BadInput("prefs junk", [*dpo, f"data.path={f['prefs_junk'].parent}"], "not a readable preference shard", w),
        # outputs
        BadInput("out under a file", [*gen[:-1], str(f["a_file"] / "sub" / "g.png")], "is not a directory", w),
    ]


class _AnyPath(dict):
    def __missing__(self, key: str) -> Path:
        return Path(key)


CASE_NAMES = [c.name for c in _cases(_AnyPath(), Path("runs"))]  # the table's rows, named at collection time


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(name, files, tmp_path, capsys, monkeypatch):
    import base_model.checkpoint

    runs = tmp_path / "runs"
    runs.mkdir()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    patch_everywhere(monkeypatch, base_model.checkpoint, "resolve_model", no_model)
    case = {c.name: c for c in _cases(files, runs)}[name]
    run_bad_input(case, capsys)


# -- unwritable / full disks -------------------------------------------------------------------


def test_generate_refuses_a_read_only_out_dir_before_sampling(tmp_path, capsys, monkeypatch):
    import tempfile

    import base_model.checkpoint

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_model(*args, **kwargs):
        raise AssertionError("sampled before checking the output directory")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    patch_everywhere(monkeypatch, base_model.checkpoint, "resolve_model", no_model)
    out = tmp_path / "ro" / "grid.png"
    case = BadInput("read-only out", ["generate", "--checkpoint", "tiny", "--prompt", "a", "--out", str(out)],
                    f"--out: cannot write to {tmp_path} (Read-only file system)", [tmp_path])  # fmt: skip
    run_bad_input(case, capsys)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_a_shard_is_one_error_and_no_temp_file(tmp_path, monkeypatch):
    from jobs.build_prefs import write_shard

    (tmp_path / "data").mkdir()

    def half_then_full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")  # what a real full disk leaves behind
        _disk_full()

    monkeypatch.setattr(pq, "write_table", half_then_full)
    with pytest.raises(UserError, match=r"data/shard-000003.parquet: cannot write \(No space left on device\)"):
        write_shard(tmp_path, 3, [], ["jpeg", "composite"])
    assert list((tmp_path / "data").iterdir()) == []


def test_build_prefs_on_a_full_disk_exits_2_with_no_shard_or_temp_file(tmp_path, capsys, monkeypatch):
    """Through the CLI: sampling and scoring run, the first shard write finds the disk full. The run
    directory and its config stay (a rerun resumes there); the data directory holds nothing."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "prefs"
    monkeypatch.setattr(pq, "write_table", lambda table, where, **kw: (Path(where).write_bytes(b"PAR1"), _disk_full()))
    argv = ["build-prefs", str(CONFIGS / "prefs" / "tiny.yaml"), f"out_dir={out}", f"prompts.path={prompts}",
            "samples_per_prompt=2", "pairs.top_k=1", "sampling.num_head_steps=2",
            "rollout.pool.kind=local"]  # fmt: skip
    run_bad_input(BadInput("disk full", argv, f"{out}/data/shard-000000.parquet: cannot write (No space left"), capsys)
    assert list((out / "data").iterdir()) == []


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "No space left on device"),
                                           (errno.EDQUOT, "Disk quota exceeded"),
                                           (errno.EROFS, "Read-only file system")])  # fmt: skip
def test_a_full_disk_while_saving_the_vae_is_one_error_and_no_temp_file(tmp_path, monkeypatch, code, message):
    from base_model.vae import NextStepVAE, save_vae, vae_preset

    vae = NextStepVAE(vae_preset("tiny"))

    def fail(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError(code, message)

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(UserError, match=rf"vae/checkpoint.pt: cannot write \({message}\)"):
        save_vae(vae, tmp_path / "vae")
    assert list((tmp_path / "vae").iterdir()) == []


def test_other_write_errors_keep_their_traceback(tmp_path, monkeypatch):
    """An I/O fault that is not the user's to fix (EIO) is not dressed up as bad input."""
    from jobs.build_prefs import write_shard

    (tmp_path / "data").mkdir()

    def io_error(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pq, "write_table", io_error)
    with pytest.raises(OSError) as e:
        write_shard(tmp_path, 0, [], ["composite"])
    assert not isinstance(e.value, UserError) and e.value.errno == errno.EIO
