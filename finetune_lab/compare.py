"""`finetune compare RUNS...`: the runs of one or more experiments, grouped, as mean +- std over seeds.

    finetune compare runs/sst2_full runs/sst2_lora runs/sst2_fgm --baseline sst2_full --out reports/sst2

RUNS are run directories (`runs/<experiment>/version_N`), experiment folders (every run in them) or
globs of either. Each run contributes its resolved `config.yaml`, its final metrics
(`final_metrics.json`), the best value of each validation metric (`best_metrics.json`) and its
`metrics.csv` (learning curves). Runs are grouped by experiment, or by the values of config keys
(`--by model.lr,model.regimes.0.class_path`). Per metric and group the table gives n, mean +- std (sample
std, ddof 1), min / max and a 95 % percentile-bootstrap confidence interval of the mean; `--baseline GROUP`
adds each group's difference to the baseline with two two-sided p-values: a bootstrap one, paired over
the seeds both groups ran (the per-seed differences, centred, resampled) or unpaired when they share no
seed (both groups shifted to the pooled mean and resampled separately), and the table says which; and an
exact one (sign-flip test over the shared seeds, or a permutation test when unpaired). With few seeds
the bootstrap one is too small (3 seeds allow only 10 distinct resamples); the exact one cannot go below
2 / 2^n for n paired seeds (0.25 for 3), which is what so few seeds can show. Runs without final
metrics (failed, killed, still running) are listed, never averaged. A run that was resumed in another run
directory (`--ckpt_path`) counts once, as the run that finished, with the curve of both parts.

`--out DIR` writes compare.csv, compare.md and, per metric, `final_<metric>.png` (each seed's value per
group, with the mean and std) and `curve_<metric>.png` (mean over the group's runs per step, +- std band).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from finetune_lab.errors import InputError

RUN_DIR = re.compile(r"(version|job)_[\w.-]+")
BOOTSTRAP = 10_000
LOWER_IS_BETTER = {"loss", "perplexity", "ppl", "nll", "error", "err", "wer", "cer", "ter", "mse", "mae", "rmse"}
EXACT_LIMIT = 20_000  # sign flips / permutations enumerated exactly up to this many


class CompareError(InputError):
    """Bad input to `finetune compare` (no runs, an unknown baseline or key...)."""


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities, error rates, squared / absolute errors: by whole words of the metric's name
    (`val/loss_adv@0.25` yes, `val/answer_f1` no)."""
    words = re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower())
    return any(word in LOWER_IS_BETTER for word in words)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys; list items by index: {'model': {'regimes': [{'class_path': X}]}} ->
    {'model.regimes.0.class_path': X}. Empty dicts and lists stay as values."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, (list, tuple)) and node:
        out = {}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


@dataclass
class Run:
    path: str
    experiment: str
    config: dict = field(default_factory=dict)
    final: dict[str, float] | None = None
    best: dict[str, float] = field(default_factory=dict)
    problem: str | None = None  # why it has no final metrics
    resumed_from: str | None = None

    @property
    def flat(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed_everything")
        return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None

    def value(self, metric: str) -> float | None:
        """A metric of the run: a final one, or `best/<metric>` from the best values."""
        if metric.startswith("best/"):
            v = self.best.get(metric[5:])
        else:
            v = (self.final or {}).get(metric)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """(step, value) of `metric` from metrics.csv; a resumed run has the parts before each resume in front
        (following `resumed_from` back through every earlier part)."""
        points = _csv_curve(os.path.join(self.path, "metrics.csv"), metric)
        previous, seen = self.resumed_from, {os.path.realpath(self.path)}
        while previous and os.path.realpath(previous) not in seen:
            seen.add(os.path.realpath(previous))
            first = points[0][0] if points else math.inf
            points = [p for p in _csv_curve(os.path.join(previous, "metrics.csv"), metric) if p[0] < first] + points
            marker = os.path.join(previous, "resumed_from")
            previous = open(marker).read().strip() if os.path.isfile(marker) else None
        return points


def _csv_curve(path: str, metric: str) -> list[tuple[int, float]]:
    if not os.path.isfile(path):
        return []
    points = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            value, step = row.get(metric), row.get("step")
            if value not in (None, "") and step not in (None, ""):
                points.append((int(float(step)), float(value)))
    return points


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: not readable JSON ({e}); delete or repair the file.") from e
    return data if isinstance(data, dict) else None


def load_run(path: str) -> Run:
    config_path = os.path.join(path, "config.yaml")
    config: dict = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    experiment = str(config.get("experiment") or os.path.basename(os.path.dirname(os.path.abspath(path))))
    run = Run(path=path, experiment=experiment, config=config)
    run.final = _read_json(os.path.join(path, "final_metrics.json"))
    run.best = _read_json(os.path.join(path, "best_metrics.json")) or {}
    if run.final is None:
        resumable = os.path.isfile(os.path.join(path, "checkpoints", "last.ckpt"))
        run.problem = "no final_metrics.json: it failed, was killed or is still running" + (
            " (its checkpoints/last.ckpt can resume it: finetune fit ... --ckpt_path last)" if resumable else "")
    marker = os.path.join(path, "resumed_from")
    if os.path.isfile(marker):
        with open(marker) as f:
            run.resumed_from = f.read().strip() or None
    return run


def run_dirs(patterns: list[str], error: type[Exception] = None) -> list[str]:
    """The run directories named by `patterns`: run directories, experiment folders (their version_N / job_N
    run directories), or globs of either. `error` (CompareError by default) is raised on a pattern that names none."""
    error = error or CompareError
    dirs: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise error(f"{pattern}: matches no file or folder.")
        for path in matches:
            if not os.path.isdir(path):
                raise error(f"{path}: not a folder; pass run directories (runs/EXPERIMENT/version_N) or experiment folders.")
            if _is_run(path):
                dirs.append(path)
                continue
            inner = sorted(p for p in glob.glob(os.path.join(path, "*")) if os.path.isdir(p) and RUN_DIR.fullmatch(os.path.basename(p)))
            if not inner:
                raise error(f"{path}: neither a run directory (no config.yaml, metrics.csv or final_metrics.json) "
                            "nor an experiment folder (no version_N / job_N run directories in it).")
            dirs.extend(inner)
    return dirs


def discover(patterns: list[str]) -> tuple[list[Run], list[tuple[str, str]]]:
    """The runs named by `patterns` (run directories, experiment folders, globs), and the run directories
    left out with why (continued in another run directory)."""
    dirs = run_dirs(patterns)
    seen, runs, left_out = set(), [], []
    for path in dirs:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        continued = os.path.join(path, "resumed_in")
        if os.path.isfile(continued):
            with open(continued) as f:
                target = f.read().strip()
            if os.path.isdir(target):
                left_out.append((path, f"continued in {target} (counted there)"))
                continue
        runs.append(load_run(path))
    if not runs:
        raise CompareError(f"No runs in {' '.join(patterns)}.")
    return runs, left_out


def _is_run(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("config.yaml", "metrics.csv", "final_metrics.json"))


def group_runs(runs: list[Run], by: list[str] | None) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    if by:
        known = set().union(*(r.flat.keys() for r in runs))
        unknown = [k for k in by if k not in known]
        if unknown:
            close = {k: sorted(c for c in known if k.split(".")[-1] in c)[:5] for k in unknown}
            raise CompareError("--by: no run's config has " + "; ".join(
                f"{k}" + (f" (did you mean {', '.join(v)}?)" if v else "") for k, v in close.items()) + ".")
    for run in runs:
        name = ",".join(f"{k}={run.flat.get(k, '<unset>')}" for k in by) if by else run.experiment
        groups.setdefault(name, []).append(run)
    return groups


# ---------------------------------------------------------------- statistics
@dataclass
class Stats:
    n: int
    mean: float
    std: float
    min: float
    max: float
    ci: tuple[float, float]
    seeds: list[int | None]


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, level: float = 0.95, resamples: int = BOOTSTRAP) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    if len(values) == 1:
        return float(values[0]), float(values[0])
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def describe(values: list[float], seeds: list[int | None], seed: int = 0) -> Stats:
    x = np.asarray(values, dtype=np.float64)
    std = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
    return Stats(n=len(x), mean=float(x.mean()), std=std, min=float(x.min()), max=float(x.max()),
                 ci=bootstrap_ci(x, np.random.default_rng(seed)), seeds=seeds)


def _p_from(count: int, total: int) -> float:
    """A Monte Carlo p-value that is never 0: (k + 1) / (B + 1)."""
    return (count + 1) / (total + 1)


def paired_bootstrap_p(differences: np.ndarray, rng: np.random.Generator, resamples: int = BOOTSTRAP) -> float:
    """Two-sided bootstrap p-value of mean(differences) = 0: the centred differences resampled; the share of
    resampled means at least as far from 0 as the observed one, as (k + 1) / (B + 1)."""
    observed = differences.mean()
    centred = differences - observed
    means = centred[rng.integers(0, len(centred), size=(resamples, len(centred)))].mean(axis=1)
    return _p_from(int(np.sum(np.abs(means) >= abs(observed) - 1e-12)), resamples)


def unpaired_bootstrap_p(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int = BOOTSTRAP) -> float:
    """Two-sided bootstrap p-value of mean(a) = mean(b): both shifted to the pooled mean, resampled separately."""
    observed = a.mean() - b.mean()
    pooled = np.concatenate([a, b]).mean()
    a0, b0 = a - a.mean() + pooled, b - b.mean() + pooled
    ma = a0[rng.integers(0, len(a0), size=(resamples, len(a0)))].mean(axis=1)
    mb = b0[rng.integers(0, len(b0), size=(resamples, len(b0)))].mean(axis=1)
    return _p_from(int(np.sum(np.abs(ma - mb) >= abs(observed) - 1e-12)), resamples)


def sign_flip_p(differences: np.ndarray, rng: np.random.Generator, resamples: int = BOOTSTRAP) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of mean(differences) = 0: every assignment of
    signs when there are at most EXACT_LIMIT, else a Monte Carlo sample. With n seeds it is at least 2 / 2^n
    (0.25 for 3 seeds): what so few seeds can show."""
    n = len(differences)
    observed = abs(differences.mean())
    if 2 ** n <= EXACT_LIMIT:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12))
    signs = rng.choice([-1.0, 1.0], size=(resamples, n))
    return _p_from(int(np.sum(np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12)), resamples)


def permutation_p(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int = BOOTSTRAP) -> float:
    """Two-sided permutation p-value of mean(a) = mean(b): exact over every split of the pooled values when
    there are at most EXACT_LIMIT, else a Monte Carlo sample."""
    from itertools import combinations

    pooled = np.concatenate([a, b])
    n, observed = len(a), abs(a.mean() - b.mean())
    total = pooled.sum()
    if math.comb(len(pooled), n) <= EXACT_LIMIT:
        sums = np.array([pooled[list(idx)].sum() for idx in combinations(range(len(pooled)), n)])
        diffs = sums / n - (total - sums) / (len(pooled) - n)
        return float(np.mean(np.abs(diffs) >= observed - 1e-12))
    count = 0
    for _ in range(resamples):
        perm = rng.permutation(pooled)
        count += abs(perm[:n].mean() - perm[n:].mean()) >= observed - 1e-12
    return _p_from(count, resamples)


@dataclass
class Difference:
    diff: float
    p: float | None  # bootstrap
    pairing: str  # "paired (n seeds)" | "unpaired" | why there is no p-value
    p_exact: float | None = None  # sign-flip (paired) or permutation (unpaired) test


def versus(group: list[tuple[int | None, float]], baseline: list[tuple[int | None, float]], seed: int = 0) -> Difference:
    """The difference of the group's mean to the baseline's, with its bootstrap and exact p-values: paired over
    the seeds both ran (the difference is then the mean of the per-seed differences), else unpaired."""
    ga = np.array([v for _, v in group])
    gb = np.array([v for _, v in baseline])
    diff = float(ga.mean() - gb.mean())
    by_seed_a: dict[int, list[float]] = {}
    by_seed_b: dict[int, list[float]] = {}
    for s, v in group:
        if s is not None:
            by_seed_a.setdefault(s, []).append(v)
    for s, v in baseline:
        if s is not None:
            by_seed_b.setdefault(s, []).append(v)
    shared = sorted(set(by_seed_a) & set(by_seed_b))
    duplicated = any(len(by_seed_a[s]) > 1 or len(by_seed_b[s]) > 1 for s in shared)
    rng = np.random.default_rng(seed)
    if shared and not duplicated:
        d = np.array([by_seed_a[s][0] - by_seed_b[s][0] for s in shared])
        if len(d) < 2:
            return Difference(diff, None, "1 shared seed: no p-value")
        note = "" if len(shared) == len(ga) == len(gb) else f", {len(ga) - len(shared)} + {len(gb) - len(shared)} unshared runs left out"
        return Difference(float(d.mean()), paired_bootstrap_p(d, rng), f"paired ({len(shared)} seeds{note})",
                          sign_flip_p(d, np.random.default_rng(seed)))
    if len(ga) < 2 or len(gb) < 2:
        return Difference(diff, None, "no shared seeds, < 2 runs: no p-value")
    why = "a seed repeats within a group" if duplicated else "no shared seeds"
    return Difference(diff, unpaired_bootstrap_p(ga, gb, rng), f"unpaired ({why})", permutation_p(ga, gb, np.random.default_rng(seed)))


# ---------------------------------------------------------------- the comparison
@dataclass
class Row:
    metric: str
    group: str
    stats: Stats
    vs: Difference | None = None


def default_metrics(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs if r.final for k in r.final if k.startswith(("val/", "test/"))})
    return [k for k in keys if not k.endswith("_best")]


def compare(runs: list[Run], metrics: list[str], by: list[str] | None = None, baseline: str | None = None
            ) -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows per metric and group, and the runs not averaged (with why)."""
    groups = group_runs(runs, by)
    if baseline is not None and baseline not in groups:
        raise CompareError(f"--baseline {baseline}: no such group; the groups are {', '.join(sorted(groups))}.")
    not_averaged = [(r.path, r.problem) for r in runs if r.problem]
    rows: list[Row] = []
    for metric in metrics:
        values = {name: [(r.seed, v) for r in members if not r.problem and (v := r.value(metric)) is not None]
                  for name, members in groups.items()}
        for name, members in groups.items():
            for r in members:
                if not r.problem and r.value(metric) is None:
                    not_averaged.append((r.path, f"has no {metric}"))
        for name in groups:
            pairs = values[name]
            if not pairs:
                continue
            row = Row(metric, name, describe([v for _, v in pairs], [s for s, _ in pairs]))
            if baseline is not None and name != baseline and values.get(baseline):
                row.vs = versus(pairs, values[baseline])
            rows.append(row)
    if not rows:
        raise CompareError(f"None of the runs has {', '.join(metrics)} in its final metrics; "
                           f"the first run has {', '.join(sorted(runs[0].final or {})) or 'no final metrics'}.")
    return rows, list(dict.fromkeys(not_averaged))


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p: float | None) -> str:
    return "-" if p is None else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def table_columns(with_baseline: bool) -> list[str]:
    cols = ["group", "n", "mean +- std", "min", "max", "95% CI"]
    return cols + (["diff vs baseline", "p (bootstrap)", "p (exact)", "pairing"] if with_baseline else [])


def row_cells(row: Row, with_baseline: bool) -> list[str]:
    s = row.stats
    cells = [row.group, str(s.n), f"{_fmt(s.mean)} +- {_fmt(s.std)}", _fmt(s.min), _fmt(s.max), f"[{_fmt(s.ci[0])}, {_fmt(s.ci[1])}]"]
    if with_baseline:
        vs = row.vs
        cells += ["(baseline)", "", "", ""] if vs is None else [f"{vs.diff:+.4f}", _p(vs.p), _p(vs.p_exact), vs.pairing]
    return cells


def print_tables(rows: list[Row], not_averaged: list[tuple[str, str]], left_out: list[tuple[str, str]], baseline: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # files and pipes: wide, nothing folded
    for metric in dict.fromkeys(r.metric for r in rows):
        arrow = "lower is better" if lower_is_better(metric) else "higher is better"
        table = Table(title=f"{metric} ({arrow})")
        for col in table_columns(baseline is not None):
            table.add_column(col, no_wrap=col != "group", overflow="fold")
        for row in rows:
            if row.metric == metric:
                table.add_row(*row_cells(row, baseline is not None))
        console.print(table)
    for title, items in (("Not averaged", not_averaged), ("Left out", left_out)):
        if items:
            console.print(f"[bold]{title}:[/bold]")
            for path, why in items:
                console.print(f"  {path}: {why}")


def write_outputs(out: str, rows: list[Row], runs: list[Run], groups: dict[str, list[Run]], not_averaged, left_out,
                  baseline: str | None, curve_metrics: list[str]) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = []
    path = os.path.join(out, "compare.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "group", "n", "mean", "std", "min", "max", "ci95_low", "ci95_high", "seeds",
                    "diff_vs_baseline", "p_bootstrap", "p_exact", "pairing"])
        for r in rows:
            s, vs = r.stats, r.vs
            w.writerow([r.metric, r.group, s.n, s.mean, s.std, s.min, s.max, s.ci[0], s.ci[1],
                        " ".join("-" if x is None else str(x) for x in s.seeds),
                        "" if vs is None else vs.diff, "" if vs is None or vs.p is None else vs.p,
                        "" if vs is None or vs.p_exact is None else vs.p_exact, "" if vs is None else vs.pairing])
    written.append(path)
    path = os.path.join(out, "compare.md")
    with open(path, "w") as f:
        cols = table_columns(baseline is not None)
        for metric in dict.fromkeys(r.metric for r in rows):
            f.write(f"### {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)\n\n")
            f.write("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n")
            for row in rows:
                if row.metric == metric:
                    f.write("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(row, baseline is not None)) + " |\n")
            f.write("\n")
        for title, items in (("Not averaged", not_averaged), ("Left out", left_out)):
            if items:
                f.write(f"**{title}:**\n\n" + "".join(f"- `{p}`: {why}\n" for p, why in items) + "\n")
    written.append(path)
    written += plot_finals(out, rows, groups)
    for metric in curve_metrics:
        png = plot_curve(out, metric, groups)
        if png:
            written.append(png)
    return written


def _slug(metric: str) -> str:
    return re.sub(r"[^\w.-]+", "_", metric).strip("_")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10})
    return plt


def plot_finals(out: str, rows: list[Row], groups: dict[str, list[Run]]) -> list[str]:
    """Per metric: each run's final value as a dot per group, the group mean as a bar with +- std."""
    plt = _pyplot()
    written = []
    for metric in dict.fromkeys(r.metric for r in rows):
        mine = [r for r in rows if r.metric == metric]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(mine) + 2), 4.2))
        rng = np.random.default_rng(0)
        for i, row in enumerate(mine):
            values = [v for r in groups[row.group] if not r.problem and (v := r.value(metric)) is not None]
            jitter = rng.uniform(-0.08, 0.08, len(values))
            ax.scatter(np.full(len(values), i) + jitter, values, s=36, alpha=0.8, zorder=3, label="one seed" if i == 0 else None)
            std = 0.0 if math.isnan(row.stats.std) else row.stats.std
            ax.errorbar([i + 0.22], [row.stats.mean], yerr=[std], fmt="D", color="black", capsize=5, zorder=4,
                        label="mean +- std" if i == 0 else None)
        ax.set_xticks(range(len(mine)), [_wrap(r.group) for r in mine])
        ax.set_ylabel(metric)
        ax.set_xlabel("group")
        ax.set_title(f"{metric}: final value per seed ({'lower' if lower_is_better(metric) else 'higher'} is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        path = os.path.join(out, f"final_{_slug(metric)}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _wrap(name: str, width: int = 18) -> str:
    parts, line = [], ""
    for piece in re.split(r"(?<=[,+/=])", name):
        if line and len(line) + len(piece) > width:
            parts.append(line)
            line = ""
        line += piece
    return "\n".join(parts + [line])


def plot_curve(out: str, metric: str, groups: dict[str, list[Run]]) -> str | None:
    """Learning curve: per group the mean over its runs at each logged step, +- std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = False
    for name, members in groups.items():
        by_step: dict[int, list[float]] = {}
        for r in members:
            if r.problem:
                continue
            for step, value in r.curve(metric):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = np.array(sorted(by_step))
        mean = np.array([np.mean(by_step[s]) for s in steps])
        std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
        n = max(len(v) for v in by_step.values())
        line, = ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, ms=3, label=f"{name} (n={n})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over training: mean +- std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = os.path.join(out, f"curve_{_slug(metric)}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, experiment folders, or globs of either")
    p.add_argument("--by", default="", help="group by these config keys (comma-separated, dotted: model.lr,data.init_args.few_shot)")
    p.add_argument("--metrics", default="", help="metrics to compare (comma-separated; best/<metric> for the best value "
                                                 "over the run); default: every val/ and test/ metric")
    p.add_argument("--baseline", default=None, help="the group the others are compared with (difference, p-value)")
    p.add_argument("--curve", default="", help="metrics whose learning curves are plotted (default: the first metric)")
    p.add_argument("--out", default=None, help="write compare.csv, compare.md and PNG plots here")
    args = p.parse_args(argv)
    runs, left_out = discover(args.runs)
    metrics = [m for m in args.metrics.split(",") if m] or default_metrics(runs)
    if not metrics:
        raise CompareError("None of the runs has final val/ or test/ metrics; name them with --metrics.")
    by = [k for k in args.by.split(",") if k] or None
    rows, not_averaged = compare(runs, metrics, by, args.baseline)
    print_tables(rows, not_averaged, left_out, args.baseline)
    if args.out:
        groups = group_runs(runs, by)
        curves = [m for m in args.curve.split(",") if m] or [metrics[0].removeprefix("best/")]
        for path in write_outputs(args.out, rows, runs, groups, not_averaged, left_out, args.baseline, curves):
            print(f"wrote {path}", file=sys.stderr)
    return 0
