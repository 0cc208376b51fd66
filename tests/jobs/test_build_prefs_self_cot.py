"""`nsalign build-prefs` with Self-CoT on the tiny model: every row stores both samples' reasoning, read_pairs
returns it with the template, the stored ids re-score through the teacher-forced pass, a redone shard is the
same file, and datasets that mix Self-CoT and image-only shards (or templates) are refused in one line."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from base_model.checkpoint import build_random
from base_model.generate import sample_prompts
from base_model.sequence import build_self_cot_batch
from base_model.teacher_forcing import teacher_forced
from base_model.text import CotConfig
from core.errors import UserError
from core.schema import load_config
from jobs.build_prefs import BuildPrefsConfig, run_build_prefs
from jobs.cli import main
from rollout.prefs_format import DATA_DIR, TEXT_FIELDS, read_pairs, shard_paths

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prefs" / "tiny_self_cot.yaml"
PROMPTS = ["a red circle", "two blue squares", "a green star", "a yellow triangle", "a black cat", "three dots"]
MAX_TEXT = 6  # tiny_self_cot.yaml: a random model seldom stops, so most texts are cut at 6 tokens


@pytest.fixture(autouse=True)
def _one_thread():
    """The job's workers run one torch thread (the config's rollout.num_threads); so does the re-sampling here
    (two threads on two busy cores are ~50x slower for this tiny model). The suite gets its count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overrides(tmp_path: Path, out: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"out_dir={tmp_path / out}", f"prompts.path={prompts}", "prompts.limit=null", "prompts_per_shard=2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, BuildPrefsConfig]:
    """(the dataset directory, its config): 6 prompts x 4 samples in 3 shards of 2 prompts."""
    tmp = tmp_path_factory.mktemp("self_cot")
    threads = torch.get_num_threads()
    config = load_config(BuildPrefsConfig, CONFIG, _overrides(tmp, "ds"))
    run_build_prefs(config)
    torch.set_num_threads(threads)
    return tmp / "ds", config


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)  # what the rollout worker samples from (resolve_model's seed)


def _table(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in shard_paths(out)])  # read_pairs' order


def test_rows_store_each_samples_own_reasoning(built, tiny):
    out, config = built
    table = _table(out)
    assert len(shard_paths(out)) == 3 and table.num_rows == len(PROMPTS)  # one pair per prompt
    assert {name: table.schema.field(name).type for name in TEXT_FIELDS} == {
        "chosen_text": pa.string(), "rejected_text": pa.string(),
        "chosen_text_ids": pa.list_(pa.int32()), "rejected_text_ids": pa.list_(pa.int32()),
        "chosen_text_stopped": pa.bool_(), "rejected_text_stopped": pa.bool_(),
    }  # fmt: skip
    for row in table.to_pylist():
        for side in ("chosen", "rejected"):
            ids, stopped = row[f"{side}_text_ids"], row[f"{side}_text_stopped"]
            assert len(ids) <= MAX_TEXT and (stopped or len(ids) == MAX_TEXT)
            assert tiny.tokenizer.decode(ids, skip_special_tokens=False) == row[f"{side}_text"]
    assert json.loads((out / "manifest.json").read_text())["self_cot"] is True


def test_read_pairs_returns_texts_ids_stopped_and_the_template(built):
    out, config = built
    table, pairs = _table(out), read_pairs(out)
    assert pairs.self_cot and pairs.cot == config.sampling.cot
    assert pairs.cot.template.startswith("{caption}\nPlan") and pairs.cot.max_text_tokens == MAX_TEXT
    for side in ("chosen", "rejected"):
        assert getattr(pairs, f"{side}_text_ids") == table.column(f"{side}_text_ids").to_pylist()
        assert getattr(pairs, f"{side}_text") == table.column(f"{side}_text").to_pylist()
        stopped = getattr(pairs, f"{side}_text_stopped")
        assert stopped.dtype == torch.bool and stopped.tolist() == table.column(f"{side}_text_stopped").to_pylist()


def test_stored_reasoning_rescores_as_it_was_sampled(built, tiny):
    """build_self_cot_batch + teacher_forced on the stored ids and image tokens give finite text log-probs,
    equal to the ones the sampler drew the same samples with."""
    out, config = built
    pairs, table = read_pairs(out), _table(out)
    batch = build_self_cot_batch(tiny.tokenizer, tiny.ids, pairs.prompts, (64, 64), config.sampling.uses_guidance,
                                 pairs.cot, texts=pairs.chosen_text_ids)  # fmt: skip
    forced = teacher_forced(tiny.model, batch, tiny.ids, pairs.chosen_tokens, text_stopped=pairs.chosen_text_stopped)
    assert forced.text_log_probs.shape == (len(pairs), MAX_TEXT + 1) and torch.isfinite(forced.text_log_probs).all()
    assert (forced.text_log_probs.sum(-1) < 0).all()
    # the chosen samples re-drawn from their seeds: the same reasoning (each row's own, not a neighbour's)
    sampled = sample_prompts(tiny, pairs.prompts, table.column("chosen_seed").to_pylist(), config.sampling).text
    assert sampled.rows() == pairs.chosen_text_ids and torch.equal(sampled.stopped, pairs.chosen_text_stopped)
    torch.testing.assert_close(forced.text_log_probs, sampled.log_probs, atol=1e-5, rtol=1e-5)


def test_a_redone_shard_is_the_same_file_texts_included(built):
    out, _ = built
    shard = out / DATA_DIR / "shard-000001.parquet"
    before = pq.read_table(shard)
    shard.unlink()
    assert main(["build-prefs", str(CONFIG), *_overrides(out.parent, "ds")]) == 0  # the same command again
    after = pq.read_table(shard)
    assert after.equals(before) and after.column("chosen_text").to_pylist() == before.column("chosen_text").to_pylist()


def _rewrite(shard: Path, edit) -> None:
    pq.write_table(edit(pq.read_table(shard)), shard)


def _claims_image_only(table: pa.Table) -> pa.Table:
    """The shard with sampling settings that say self_cot false."""
    sampling = [json.dumps({**json.loads(s), "self_cot": False}) for s in table.column("sampling").to_pylist()]
    return table.set_column(table.schema.get_field_index("sampling"), "sampling", pa.array(sampling))


def _image_only(table: pa.Table) -> pa.Table:
    """The shard as an image-only build writes it: no text columns, sampling settings without Self-CoT."""
    return _claims_image_only(table).drop_columns(list(TEXT_FIELDS))


def _other_template(table: pa.Table) -> pa.Table:
    settings = [json.loads(s) for s in table.column("sampling").to_pylist()]
    sampling = [json.dumps({**s, "cot": {**s["cot"], "template": "{caption}: think"}}) for s in settings]
    return table.set_column(table.schema.get_field_index("sampling"), "sampling", pa.array(sampling))


def test_an_image_only_shard_reads_without_texts(built, tmp_path):
    out, _ = built
    (tmp_path / DATA_DIR).mkdir()
    old = tmp_path / DATA_DIR / "shard-000000.parquet"
    shutil.copy(out / DATA_DIR / "shard-000000.parquet", old)
    _rewrite(old, _image_only)
    pairs = read_pairs(tmp_path)
    assert len(pairs) == 2 and not pairs.self_cot and pairs.cot is None
    assert pairs.chosen_text is None and pairs.rejected_text_ids is None and pairs.chosen_text_stopped is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _image_only,
            "mixes Self-CoT shards (shard-000000.parquet, with reasoning text) and image-only shards "
            "(shard-000001.parquet)",
        ),  # fmt: skip
        (_other_template, "pairs written with 2 different CoT settings"),
        (lambda t: t.drop_columns(["rejected_text_stopped"]), "no column 'rejected_text_stopped'"),
    ],
)
def test_mixed_datasets_are_refused_in_one_line(built, tmp_path, edit, message):
    out, _ = built
    copy = tmp_path / "mixed"
    shutil.copytree(out, copy)
    _rewrite(copy / DATA_DIR / "shard-000001.parquet", edit)
    with pytest.raises(UserError) as error:
        read_pairs(copy)
    assert message in str(error.value) and "\n" not in str(error.value)
    where = copy / DATA_DIR / "shard-000001.parquet" if "no column" in message else copy
    assert str(error.value).startswith(f"{where}: ")


def test_sampling_settings_must_agree_with_the_columns(built, tmp_path):
    out, _ = built
    copy = tmp_path / "liar"
    shutil.copytree(out, copy)
    for shard in shard_paths(copy):  # every shard has the text columns but says its sampler wrote no text
        _rewrite(shard, _claims_image_only)
    with pytest.raises(UserError) as error:
        read_pairs(copy)
    assert str(error.value) == (
        f"{copy}: the shards have reasoning text columns but column 'sampling' says self_cot: false"
    )


def test_reasoning_that_cannot_fit_the_model_is_refused_at_load(tmp_path, capsys):
    assert main(["build-prefs", str(CONFIG), *_overrides(tmp_path, "big"), "sampling.cot.max_text_tokens=5000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reasoning" in err[0] and "sampling.max_prompt_tokens" in err[0]
    assert not (tmp_path / "big").exists()


def test_cot_config_round_trips_through_the_sampling_column(built):
    out, config = built
    sampling = json.loads(_table(out).column("sampling")[0].as_py())
    assert sampling["self_cot"] is True and CotConfig(**sampling["cot"]) == config.sampling.cot
