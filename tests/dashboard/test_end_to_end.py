"""evaluate -> select -> dashboard on a tiny run through `nsalign`, and the page in a real headless Chromium."""

import io
import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from tests.dashboard.handmade import eval_dir
from tests.jobs.test_select_job import PROMPTS, make_tiny_run

ROOT = Path(__file__).resolve().parents[2]
EVALUATE, SELECT = ROOT / "configs" / "evaluate" / "tiny.yaml", ROOT / "configs" / "select" / "tiny.yaml"
SCREENSHOT = ROOT / "out" / "dashboard" / "screenshot.png"


def _png(rng: np.random.Generator, side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _prefs_dataset(out: Path) -> Path:
    """A small build-prefs-format dataset (format of rollout/prefs_format.py), made by hand."""
    from rollout.prefs_format import pairs_schema

    rng, rows = np.random.default_rng(0), []
    for i in range(6):
        c, r = {"jpeg": -1.0 + 0.1 * i, "aesthetic": 0.2}, {"jpeg": -1.3, "aesthetic": 0.3 - 0.1 * i}
        rows.append({"prompt_id": f"{i:016x}", "prompt": f"pair prompt {i}", "pair_index": 0,
                     "chosen_image": _png(rng), "rejected_image": _png(rng), "chosen_tokens": [[0.0] * 64],
                     "rejected_tokens": [[0.0] * 64], "chosen_scores": c, "rejected_scores": r,
                     "chosen_reward": c["jpeg"], "rejected_reward": r["jpeg"], "chosen_seed": 1, "rejected_seed": 2,
                     "chosen_sample_index": 0, "rejected_sample_index": 1, "strategy": "nextstep", "sampling": "{}",
                     "checkpoint": "tiny", "policy_version": 0})  # fmt: skip
    (out / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=pairs_schema(["jpeg", "aesthetic"])), out / "data" / "shard-000000.parquet"
    )
    (out / "manifest.json").write_text(
        json.dumps({"rewards": ["jpeg", "aesthetic"], "primary": "jpeg", "num_pairs": 6})
    )
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run = make_tiny_run(tmp / "run")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    rng = np.random.default_rng(1)
    heldout = tmp / "heldout.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"caption": f"held out {i}", "image": _png(rng, 40)} for i in range(4)]), heldout
    )
    select_args = ["select", str(SELECT), f"run_dir={run}", f"eval.prompts.path={prompts}", f"heldout.path={heldout}",
                   "num_resamples=200"]  # fmt: skip
    assert main(select_args) == 0
    prefs = _prefs_dataset(tmp / "prefs")
    out = tmp / "dash"
    assert main(["dashboard", str(run), str(prefs), "--out", str(out), "--num-resamples", "200"]) == 0
    return {"tmp": tmp, "run": run, "prompts": prompts, "out": out, "select_args": select_args}


def _parquet_means(eval_dir: Path) -> dict[tuple[str, str], float]:
    means = {}
    for ckpt in (eval_dir / "scores").iterdir():
        t = pa.concat_tables([pq.read_table(f) for f in ckpt.glob("shard-*.parquet")])
        for name in t.schema.field("scores").type:
            means[(ckpt.name, name.name)] = float(np.mean(t["scores"].combine_chunks().field(name.name).to_numpy()))
    return means


def test_selection_report_and_pointer(pipeline):
    run = pipeline["run"]
    report = json.loads((run / "selection.json").read_text())
    names = set(report["candidates"])
    assert (
        {"base", "step_000001", "step_000002"} <= names and any(n.startswith("soup-") for n in names) or report["soup"]
    )
    chosen = report["candidates"][report["chosen"]]
    assert not chosen["failed_guards"] and chosen["fm_loss"] is not None and chosen["diversity"] > 0
    pointer = (run / "selected").read_text().strip()
    assert pointer == "tiny" or (run / pointer / "config.json").is_file()
    assert "## Greedy soup" in (run / "selection.md").read_text()


def test_rerun_scores_nothing_again(pipeline, capsys):
    shards = sorted((pipeline["run"] / "select" / "eval" / "scores").rglob("*.parquet"))
    before = [p.stat().st_mtime_ns for p in shards]
    assert main(pipeline["select_args"]) == 0
    assert [p.stat().st_mtime_ns for p in shards] == before
    out = capsys.readouterr().out
    assert "(3 of 3 already scored)" in out and "(1 of 1 already scored)" in out and "(0 of" not in out


def test_evaluate_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", str(EVALUATE), f"out_dir={out}", "checkpoints=[tiny, /nope/model]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nsalign evaluate: error: /nope/model")
    assert not out.exists()


def test_dashboard_is_self_contained(pipeline):
    html = (pipeline["out"] / "index.html").read_text()
    for remote in ('src="http', "src='http", 'href="http', "<script src", 'rel="stylesheet"', "@import"):
        assert remote not in html
    assert html.count("data:image/png;base64,") == 3 * 4 + 6 * 2  # grid (3 prompts x 4 candidates) + pairs


def test_dashboard_error_is_one_line(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "missing"), "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip().startswith("nsalign dashboard: error: not a directory")


def test_serve_binds_localhost_and_stops(pipeline):
    from jobs.dashboard import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    thread = threading.Thread(target=serve, args=(pipeline["out"], port, 2.0), daemon=True)
    thread.start()
    for _ in range(50):
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2).read()
            break
        except OSError:
            time.sleep(0.05)
    assert b'id="data"' in body
    thread.join(timeout=10)
    assert not thread.is_alive()


def _chrome():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def _open(browser, page: Path) -> bool:
    """Load `page` and wait up to 5 s for its program to mark the body ready; whether it did."""
    from selenium.webdriver.common.by import By

    browser.get(page.as_uri())
    for _ in range(100):
        if browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1":
            return True
        time.sleep(0.05)
    return False


def test_dashboard_in_headless_chromium(pipeline):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser = _chrome()
    try:
        _open(browser, pipeline["out"] / "index.html")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        # the checkpoint x reward table shows the Parquet means
        means = _parquet_means(pipeline["run"] / "select" / "eval")
        cells = browser.find_elements(By.CSS_SELECTOR, "table.reward-table td.mean")
        assert len(cells) == len(means)
        for cell in cells:
            expected = means[(cell.get_attribute("data-checkpoint"), cell.get_attribute("data-reward"))]
            assert float(cell.get_attribute("data-value")) == pytest.approx(expected, abs=1e-12)
            assert cell.text.startswith(f"{expected:.4f}")
        # filtering and sorting the image grid
        rows = "#eval0-grid tr.grid-row"
        assert len(browser.find_elements(By.CSS_SELECTOR, rows)) == len(PROMPTS)
        browser.find_element(By.ID, "eval0-filter").send_keys("square")
        assert len(browser.find_elements(By.CSS_SELECTOR, rows)) == 1
        browser.find_element(By.ID, "eval0-filter").clear()
        Select(browser.find_element(By.CSS_SELECTOR, "#eval0-grid select:nth-of-type(1)")).select_by_index(0)
        assert browser.find_elements(By.CSS_SELECTOR, "table.selection-table")
        assert browser.find_elements(By.CSS_SELECTOR, "table.agree-table")
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, min(height + 40, 8000))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        browser.quit()


def test_prompt_that_opens_a_script_comment_renders(tmp_path):
    """`<!--<script>` in the data block used to swallow the page's program (the table never appeared)."""
    from selenium.webdriver.common.by import By

    prompts = ["<!--<script>", "a & b </script> <b>not bold</b>"]
    assert main(["dashboard", str(eval_dir(tmp_path / "eval", prompts)), "--out", str(tmp_path / "d"),
                 "--num-resamples", "20"]) == 0  # fmt: skip
    browser = _chrome()
    try:
        assert _open(browser, tmp_path / "d" / "index.html")
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        assert len(browser.find_elements(By.CSS_SELECTOR, "table.reward-table td.mean")) == 2 * 2
        cells = browser.find_elements(By.CSS_SELECTOR, "#eval0-grid tr.grid-row td.prompt")
        assert [c.text.splitlines()[0] for c in cells] == prompts  # shown literally, not parsed as markup
        assert browser.find_elements(By.CSS_SELECTOR, "#eval0-grid td.prompt b") == []
    finally:
        browser.quit()


def test_reasoning_beside_each_thumbnail_is_shown_as_text(tmp_path):
    """Self-CoT reasoning is model output: markup in it is shown literally; the Self-CoT entry is tagged and
    its gain over the same weights without Self-CoT is summarised."""
    from selenium.webdriver.common.by import By

    texts = ["<!--<script>", "1 star </script> <b>not bold</b> & more"]
    out = eval_dir(tmp_path / "eval", ["a star", "two stars"], reasoning=texts)
    assert main(["dashboard", str(out), "--out", str(tmp_path / "d"), "--num-resamples", "20"]) == 0
    browser = _chrome()
    try:
        _open(browser, tmp_path / "d" / "index.html")
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        shown = browser.find_elements(By.CSS_SELECTOR, "#eval0-grid tr.grid-row div.reasoning")
        assert [e.text for e in shown] == texts  # one per row: b's (a was sampled without Self-CoT)
        assert browser.find_elements(By.CSS_SELECTOR, "#eval0-grid div.reasoning b") == []
        tags = browser.find_elements(By.CSS_SELECTOR, "table.reward-table td.name .cot-tag")
        assert [t.find_element(By.XPATH, "..").text for t in tags] == ["bSelf-CoT"]  # name, then the tag
        deltas = browser.find_elements(By.CSS_SELECTOR, ".cot-summary span.cot-delta")
        assert [(d.get_attribute("data-reward"), float(d.get_attribute("data-value"))) for d in deltas] == [
            ("jpeg", 1.0), ("composite", 1.0)]  # b = a + 1 on every row  # fmt: skip
    finally:
        browser.quit()


def test_dashboard_imports_no_training_code():
    import subprocess
    import sys

    code = ("import sys, jobs.dashboard, dashboard.build; "
            "print([m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'alignment', 'base_model', 'rollout', 'rewards', 'deepspeed', 'ray')])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_dashboard_tables_to_wandb_offline(pipeline, tmp_path):
    assert main(["dashboard", str(pipeline["run"]), "--out", str(tmp_path), "--wandb", "--num-resamples", "100"]) == 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
@pytest.mark.ray
def test_evaluate_on_ray_matches_in_process(pipeline, tmp_path, ray_session):
    common = [str(EVALUATE), f"run_dir={pipeline['run']}", f"prompts.path={pipeline['prompts']}",
              "rollout.num_threads=1", "checkpoints=[]"]  # fmt: skip
    assert main(["evaluate", *common, f"out_dir={tmp_path / 'local'}"]) == 0
    ray_pool = ["rollout.pool.kind=ray", "rollout.pool.num_workers=2", "rollout.pool.num_cpus_per_worker=0.5"]
    assert main(["evaluate", *common, *ray_pool, f"out_dir={tmp_path / 'ray'}"]) == 0
    assert _parquet_means(tmp_path / "local") == _parquet_means(tmp_path / "ray")
