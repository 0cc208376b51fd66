"""`nsalign dashboard RUN_DIR [RUN_DIR ...] --out DIR [--serve]`: one self-contained HTML page.

RUN_DIRs may be eval directories (nsalign evaluate), run directories (metrics.jsonl; their
select/eval/ and selection.json are picked up) and preference datasets (nsalign build-prefs). The
page is DIR/index.html; it opens from file:// with no network. `--serve` serves DIR on 127.0.0.1
only, for `--serve-seconds` at most (Ctrl-C stops it earlier); the port is bound before the page is
built, so a busy port ends with one line and no file written. `--wandb` also logs the tables to
wandb (offline unless WANDB_MODE says otherwise).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from core.files import atomic_write
from dashboard.build import DashboardError, build_data
from dashboard.page import render


def write_page(out: Path, data: dict) -> Path:
    """DIR/index.html, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / "index.html"
    html = render(data)
    atomic_write(final, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return final


def log_wandb(out: Path, data: dict) -> None:
    """The checkpoint x reward tables and win rates as wandb Tables (offline by default)."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="nextstep-align", name="dashboard", dir=str(out), job_type="dashboard")
    for k, s in enumerate(data["evals"]):
        rows = []
        for i, c in enumerate(s["checkpoints"]):
            for r in s["rewards"]:
                t, d = s["table"][r][i], s["deltas"][s["baseline"]][r][i]
                rows.append([c, r, t["mean"], t["lo"], t["hi"], d["delta"], d["lo"], d["hi"]])
        cols = [
            "checkpoint",
            "reward",
            "mean",
            "ci_low",
            "ci_high",
            "delta_vs_baseline",
            "delta_ci_low",
            "delta_ci_high",
        ]
        run.log({f"eval{k}/rewards": wandb.Table(columns=cols, data=rows)})
        for r in s["rewards"]:
            win = [[c, *row] for c, row in zip(s["checkpoints"], s["winrates"][r])]
            run.log({f"eval{k}/win_rate/{r}": wandb.Table(columns=["checkpoint", *s["checkpoints"]], data=win)})
    run.finish()


def open_server(out: Path, port: int) -> ThreadingHTTPServer:
    """An HTTP server for `out`, bound to 127.0.0.1:port (0: any free port) but not serving yet."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(out))
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        reason = "already in use" if getattr(e, "errno", None) == errno.EADDRINUSE else getattr(e, "strerror", None)
        raise DashboardError(f"--port {port}: cannot serve on 127.0.0.1:{port} ({reason or e})") from None


def serve_until(server: ThreadingHTTPServer, seconds: float) -> None:
    """Serve until `seconds` pass or Ctrl-C, then close the socket."""
    timer = threading.Timer(seconds, server.shutdown)
    timer.daemon = True
    timer.start()
    print(f"dashboard: serving http://127.0.0.1:{server.server_address[1]}/ for {seconds:.0f} s (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        timer.cancel()
        server.server_close()


def serve(out: Path, port: int, seconds: float) -> None:
    """Serve `out` on 127.0.0.1:port until `seconds` pass or Ctrl-C."""
    serve_until(open_server(out, port), seconds)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, help="eval dirs, run dirs, preference datasets")
    p.add_argument("--out", type=Path, required=True, help="output directory (index.html goes there)")
    p.add_argument("--baseline", default=None, help="checkpoint the deltas start from (default: base / first)")
    p.add_argument("--num-resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--max-grid-prompts", type=int, default=200, help="prompts shown in the image grid")
    p.add_argument("--wandb", action="store_true", help="also log the tables to wandb (offline by default)")
    p.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="port for --serve (0: any free port)")
    p.add_argument("--serve-seconds", type=float, default=3600.0, help="stop serving after this long")


def run(args: argparse.Namespace) -> int:
    server = None
    try:
        if args.serve:  # bind first: a busy port must fail before anything is written
            server = open_server(args.out, args.port)
        data = build_data(args.run_dirs, args.baseline, args.num_resamples, args.max_grid_prompts)
        page = write_page(args.out, data)
    except (DashboardError, OSError) as e:
        if server is not None:
            server.server_close()
        print(f"nsalign dashboard: error: {e}", file=sys.stderr)
        return 2
    n_ckpt = sum(len(s["checkpoints"]) for s in data["evals"])
    print(f"dashboard: {len(data['evals'])} evaluations ({n_ckpt} checkpoints), {len(data['runs'])} runs with "
          f"metrics, {len(data['prefs'])} preference datasets -> {page}")  # fmt: skip
    if args.wandb:
        log_wandb(args.out, data)
    if server is not None:
        serve_until(server, args.serve_seconds)
    return 0
