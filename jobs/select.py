"""`nsalign select CONFIG [key=value ...]`: pick the checkpoint of a run to keep (docs/algorithms.md §10).

1. candidates: the starting model (`base`), every saved step_*/model, the run's EMA weights if it
   saved any, and a greedy model soup (Wortsman et al. 2022): the top `soup.top_k` checkpoints by the
   primary reward are added one at a time to a weight average, each kept only if the average's
   primary reward does not drop;
2. every candidate is evaluated by `nsalign evaluate` on the same held-out prompts and seeds
   (`<run>/select/eval/`, so a re-run skips what is scored);
3. drift guards: held-out flow-matching loss on (caption, image) pairs not fine-tuned on, within-prompt
   diversity (mean pairwise distance of a prompt's thumbnails), win rate against `base`;
4. ranking by the primary reward's mean with paired bootstrap 95% CIs of the gain over `base`;
   the chosen candidate is the best one that passes every guard.
Writes <run>/selection.json, <run>/selection.md and <run>/selected (the chosen model, written last).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from alignment.sft_data import SftDataConfig, load_pairs
from base_model.checkpoint import load_checkpoint, read_state_dict, resolve_model, save_checkpoint
from base_model.config import RANDOM_PRESETS
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, build_prompt_batch, check_sequence_fits
from base_model.teacher_forcing import sft_loss
from core.errors import ConfigError, UserError
from core.files import atomic_write_text, lock_dir, remove_partial_writes
from core.schema import load_config
from dashboard.data import prompt_groups, read_eval
from dashboard.stats import mean_ci, paired_delta_ci, win_rate, within_prompt_diversity
from rollout.evaluation import EvalSettings, evaluate_checkpoints, run_checkpoints


@dataclass
class HeldoutConfig:
    """(caption, image) pairs the run was not fine-tuned on, for the flow-matching-loss guard."""

    path: str = ""  # Parquet like the SFT data; empty: the guard is not measured (and says so)
    caption_field: str = "caption"
    image_field: str = "image"
    image_size: int = 64
    max_pairs: int = 256
    micro_batch_samples: int = 8
    seed: int = 0  # fixes t and noise: every candidate sees the same draws (paired)
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # as the SFT run's: longer captions keep their first N tokens

    def validate(self, where: str = "heldout") -> None:
        check_sequence_fits(self.max_prompt_tokens, (self.image_size, self.image_size), None,
                            f"{where}.max_prompt_tokens")  # fmt: skip


@dataclass
class GuardsConfig:
    max_fm_loss_increase: float = 0.10  # held-out FM loss may rise at most 10% over base
    max_diversity_drop: float = 0.30  # within-prompt diversity may fall at most 30% below base
    min_win_rate: float = 0.5  # primary-reward win rate against base (ties count half)


@dataclass
class SoupConfig:
    enabled: bool = True
    top_k: int = 3  # ingredients considered, best first


@dataclass
class SelectConfig:
    run_dir: str = "runs/sft"
    base_model: str | None = None  # None: the `model` of the run's config.yaml
    primary: str = "composite"  # a configured reward name, or 'composite'
    eval: EvalSettings = field(default_factory=EvalSettings)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    ema: bool = True  # add the run's EMA weights as a candidate when it saved them
    num_resamples: int = 1000  # bootstrap resamples
    bootstrap_seed: int = 0

    def validate(self, where: str = "config") -> None:
        names = [r.name for r in self.eval.rewards.rewards] + ["composite"]
        if self.primary not in names:
            raise ConfigError(f"{where}.primary: {self.primary!r} is not a configured reward ({', '.join(names)})")
        if self.soup.top_k < 2 and self.soup.enabled:
            raise ConfigError(f"{where}.soup.top_k: a soup needs >= 2 ingredients")
        if self.num_resamples < 100:
            raise ConfigError(f"{where}.num_resamples: use >= 100 bootstrap resamples")


def find_ema(run: Path) -> str | None:
    """EMA weights the run saved: <run>/ema/ or the newest step_*/ema/ (published layout)."""
    found = sorted(p for p in run.glob("step_*/ema") if (p / "config.json").is_file())
    if (run / "ema" / "config.json").is_file():
        return str(run / "ema")
    return str(found[-1]) if found else None


def base_spec(config: SelectConfig, run: Path) -> str:
    if config.base_model:
        return config.base_model

    model = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") if (
        run / "config.yaml").is_file() else None  # fmt: skip
    if not model:
        raise UserError(f"{run}: no config.yaml with a `model` key; set base_model")
    return str(model)


def soup_weights(dirs: list[str], out: Path) -> None:
    """Uniform average of the checkpoints' model weights -> `out` (published layout, atomic)."""
    total = None
    for d in dirs:
        state = read_state_dict(d, torch.float32)
        total = state if total is None else {k: total[k] + v for k, v in state.items()}
    bundle = load_checkpoint(dirs[0])
    bundle.model.load_state_dict({k: v / len(dirs) for k, v in total.items()})
    save_checkpoint(bundle, out)


def greedy_soup(config: SelectConfig, out: Path, steps: list[tuple[str, str]], primary_mean) -> dict:
    """Greedy soup over the top-k steps; returns {'candidate': (name, dir) or None, 'trials': [...]}."""
    top = sorted(steps, key=lambda c: -primary_mean(c[0]))[: config.soup.top_k]
    kept, best, trials = [top[0]], primary_mean(top[0][0]), []
    for name, spec in top[1:]:
        trial = kept + [(name, spec)]
        soup_name = "soup-" + "-".join(n.removeprefix("step_").lstrip("0") or "0" for n, _ in trial)
        soup_dir = out / soup_name / "model"
        if not (soup_dir / "config.json").is_file():
            soup_weights([s for _, s in trial], soup_dir)
        evaluate_checkpoints(config.eval, out / "eval", [(soup_name, str(soup_dir))], report_truncation=False)
        mean = primary_mean(soup_name)
        accepted = mean >= best
        trials.append({"name": soup_name, "ingredients": [n for n, _ in trial], "primary_mean": mean,
                       "accepted": accepted})  # fmt: skip
        if accepted:
            kept, best = trial, mean
    if len(kept) < 2:
        return {"candidate": None, "trials": trials}
    name = [t["name"] for t in trials if t["accepted"]][-1]
    return {"candidate": (name, str(out / name / "model")), "trials": trials}


def heldout_fm_loss(config: HeldoutConfig, spec: str, device: str) -> float:
    """Mean flow-matching loss of a candidate on the held-out pairs (fixed t and noise draws)."""
    data = SftDataConfig(config.path, config.caption_field, config.image_field, config.image_size)
    captions, images = load_pairs(data)
    captions, images = captions[: config.max_pairs], images[: config.max_pairs]
    bundle = resolve_model(spec, device=device)
    gen = torch.Generator().manual_seed(config.seed)
    losses, size = [], (config.image_size, config.image_size)
    with torch.no_grad():
        for s in range(0, len(captions), config.micro_batch_samples):
            chunk = images[s : s + config.micro_batch_samples].to(device).float() / 127.5 - 1  # [b, 3, S, S]
            tokens = bundle.vae.encode(chunk)  # [b, T, 64]
            batch = build_prompt_batch(bundle.tokenizer, bundle.ids, captions[s : s + len(chunk)], size, False,
                                       max_prompt_tokens=config.max_prompt_tokens)  # fmt: skip
            out = sft_loss(bundle.model, batch, bundle.ids, tokens, generator=gen)
            losses.append(float(out.flow_matching) * len(chunk))
    return sum(losses) / len(captions)


def guard_checks(fig: dict, base: dict, g: GuardsConfig) -> list[str]:
    """Names of the failed guards of one candidate's figures (a guard not measured never fails)."""
    failed = []
    if fig["fm_loss"] is not None and fig["fm_loss"] > base["fm_loss"] * (1 + g.max_fm_loss_increase):
        failed.append(f"held-out FM loss {fig['fm_loss']:.4f} > {1 + g.max_fm_loss_increase:.2f} x base")
    div, bdiv = fig["diversity"], base["diversity"]
    if not np.isnan(div) and not np.isnan(bdiv) and div < bdiv * (1 - g.max_diversity_drop):
        failed.append(f"diversity {div:.4f} < {1 - g.max_diversity_drop:.2f} x base ({bdiv:.4f})")
    if fig["win_rate_vs_base"] < g.min_win_rate:
        failed.append(f"win rate vs base {fig['win_rate_vs_base']:.3f} < {g.min_win_rate}")
    return failed


def candidate_figures(config: SelectConfig, results, specs: dict[str, str]) -> dict[str, dict]:
    """Every candidate's reward means, CIs, gain over base, win rate and guard figures."""
    boot = dict(num_resamples=config.num_resamples, seed=config.bootstrap_seed)
    base_row = results.checkpoints.index("base")
    figures = {}
    for c, name in enumerate(results.checkpoints):
        primary = results.scores[config.primary][c]  # [N]
        mean, low, high = mean_ci(primary, **boot)
        delta, dlow, dhigh = paired_delta_ci(primary, results.scores[config.primary][base_row], **boot)
        fm = heldout_fm_loss(config.heldout, specs[name], config.eval.rollout.device) if config.heldout.path else None
        figures[name] = {
            "path": specs[name], "primary_mean": mean, "primary_ci": [low, high],
            "delta_vs_base": delta, "delta_ci": [dlow, dhigh],
            "win_rate_vs_base": win_rate(primary, results.scores[config.primary][base_row]),
            "rewards": {r: float(results.scores[r][c].mean()) for r in results.rewards},
            "fm_loss": fm, "diversity": within_prompt_diversity(prompt_groups(results, c)),
        }  # fmt: skip
    for fig in figures.values():
        fig["failed_guards"] = guard_checks(fig, figures["base"], config.guards)
    return figures


def choose(figures: dict[str, dict]) -> tuple[str, list[str]]:
    """(chosen name, ranking best first): the best primary mean among candidates passing every guard."""
    ranking = sorted(figures, key=lambda n: -figures[n]["primary_mean"])
    passing = [n for n in ranking if not figures[n]["failed_guards"]]
    return (passing[0] if passing else "base"), ranking


def run_select(config: SelectConfig) -> Path:
    """The job. Returns the run directory."""
    run = Path(config.run_dir)
    steps = run_checkpoints(run)
    with lock_dir(run, "select"):  # the run gets selection.*, `selected` and select/: one writer at a time
        out = run / "select"
        for soup in out.glob("soup-*"):  # what a killed soup write left
            remove_partial_writes(soup)
        candidates = [("base", base_spec(config, run))] + steps
        ema = find_ema(run) if config.ema else None
        notes = []
        if ema:
            candidates.append(("ema", ema))
        elif config.ema:
            notes.append("The run saved no EMA weights (looked for ema/ and step_*/ema/): no EMA candidate.")
        print(f"select: {len(candidates)} candidates ({', '.join(n for n, _ in candidates)}) of {run}")
        evaluate_checkpoints(config.eval, out / "eval", candidates)

        def primary_mean(name: str) -> float:
            return float(read_eval(out / "eval", [name]).scores[config.primary][0].mean())

        soup = {"candidate": None, "trials": []}
        if config.soup.enabled and len(steps) >= 2:
            soup = greedy_soup(config, out, steps, primary_mean)
            if soup["candidate"]:
                candidates.append(soup["candidate"])
            else:
                notes.append(
                    "The greedy soup kept a single checkpoint (every average scored lower): no soup candidate."
                )
        specs = dict(candidates)
        results = read_eval(out / "eval", list(specs))
        if not results.complete:
            raise UserError(f"{out / 'eval'}: candidates were scored on different rows; delete it and re-run")
        figures = candidate_figures(config, results, specs)
        chosen, ranking = choose(figures)
        if not config.heldout.path:
            notes.append("heldout.path is empty: the held-out flow-matching loss guard was not measured.")
        report = {
            "run_dir": str(run), "primary": config.primary, "chosen": chosen, "chosen_path": specs[chosen],
            "ranking": ranking, "candidates": figures, "soup": soup["trials"], "notes": notes,
            "guards": {k: getattr(config.guards, k)
                       for k in ("max_fm_loss_increase", "max_diversity_drop", "min_win_rate")},
            "num_rows": len(results.prompt_ids), "eval_dir": str(out / "eval"),
        }  # fmt: skip
        report["reason"] = reason(report)
        atomic_write_text(run / "selection.json", json.dumps(report, indent=2))
        atomic_write_text(run / "selection.md", markdown(report))
        pointer = specs[chosen]
        if pointer not in RANDOM_PRESETS and Path(pointer).resolve().is_relative_to(run.resolve()):
            pointer = str(Path(pointer).resolve().relative_to(run.resolve()))
        atomic_write_text(run / "selected", pointer + "\n")  # last: a crash before it keeps the old choice
        print(f"select: chose {chosen} ({report['reason']}); see {run / 'selection.md'}")
    return run


def reason(report: dict) -> str:
    figs, chosen, primary = report["candidates"], report["chosen"], report["primary"]
    better = [n for n in report["ranking"] if figs[n]["primary_mean"] > figs[chosen]["primary_mean"]]
    c = figs[chosen]
    text = f"highest mean {primary} ({c['primary_mean']:.4f}) among candidates passing every guard"
    if better:
        text += "; ranked above it but rejected: " + "; ".join(f"{n} ({', '.join(figs[n]['failed_guards'])})"
                                                             for n in better)  # fmt: skip
    if chosen != "base":
        sig = "significant" if c["delta_ci"][0] > 0 else "not significant at 95%"
        text += f"; gain over base {c['delta_vs_base']:+.4f} [{c['delta_ci'][0]:+.4f}, {c['delta_ci'][1]:+.4f}], {sig}"
    return text


def markdown(report: dict) -> str:
    """selection.md: the choice, why, and every candidate's figures."""
    p = report["primary"]
    lines = [f"# Checkpoint selection for `{report['run_dir']}`", "",
             f"**Chosen: `{report['chosen']}`** (`{report['chosen_path']}`): {report['reason']}.", "",
             f"Primary reward `{p}`, {report['num_rows']} paired (prompt, seed) rows, 95% paired bootstrap CIs. "
             f"Guards: held-out FM loss <= {1 + report['guards']['max_fm_loss_increase']:.2f} x base, diversity >= "
             f"{1 - report['guards']['max_diversity_drop']:.2f} x base, win rate vs base >= "
             f"{report['guards']['min_win_rate']}.", "",
             f"| rank | candidate | {p} mean [95% CI] | gain vs base [95% CI] | win vs base | FM loss | diversity "
             "| guards |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for rank, name in enumerate(report["ranking"], 1):
        f = report["candidates"][name]
        fm = "n/a" if f["fm_loss"] is None else f"{f['fm_loss']:.4f}"
        lines.append(
            f"| {rank} | `{name}` | {f['primary_mean']:.4f} [{f['primary_ci'][0]:.4f}, {f['primary_ci'][1]:.4f}] "
            f"| {f['delta_vs_base']:+.4f} [{f['delta_ci'][0]:+.4f}, {f['delta_ci'][1]:+.4f}] "
            f"| {f['win_rate_vs_base']:.3f} | {fm} | {f['diversity']:.4f} "
            f"| {'pass' if not f['failed_guards'] else 'FAIL: ' + '; '.join(f['failed_guards'])} |"
        )
    rewards = list(next(iter(report["candidates"].values()))["rewards"])
    lines += ["", "## Every reward (means)", "", "| candidate | " + " | ".join(rewards) + " |",
              "|---|" + "---|" * len(rewards)]  # fmt: skip
    for name in report["ranking"]:
        lines.append(f"| `{name}` | " + " | ".join(f"{v:.4f}" for v in report["candidates"][name]["rewards"].values())
                     + " |")  # fmt: skip
    if report["soup"]:
        lines += ["", "## Greedy soup", ""] + [
            f"- `{t['name']}` = mean of {', '.join(t['ingredients'])}: {p} {t['primary_mean']:.4f}, "
            f"{'kept' if t['accepted'] else 'dropped'}" for t in report["soup"]]  # fmt: skip
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/select/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/sft_tiny primary=clipscore")


def run(args: argparse.Namespace) -> int:
    config = load_config(SelectConfig, args.config, args.overrides)
    run_select(config)
    return 0
