"""Tables of finished runs: seeds aggregated into the papers' tables, one CSV row per run, runs that look collapsed.

    python eval.py table runs/          # base / new / HM and few-shot tables (Markdown + CSV), runs.csv, flags

Tables follow protocol.md §4: per dataset, the mean (and standard deviation) over seeds; HM = 2BN/(B+N) of the
seed-averaged base and new accuracies; the average row averages base and new over datasets first and takes the HM
of those two averages (as the papers do), not the mean of per-dataset HMs.
Deliberately not here: evaluating a run again (eval.py), training (train.py).
"""
import csv
import glob
import json
import math
import os
import statistics
import sys

import numpy as np

import dapt
import recipes
from prompting import ConfigError
from runs import RunError, below_zero_shot, read_result


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def hm(base, new):
    """The harmonic mean of base and new accuracy (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def collect(root, skipped=None):
    """Every readable result.json below root, grouped by (setting, method+tag, dataset, shots) -> list of results. A
    folder dataset's rows are keyed by its folder's name ("folder:<name>"). Unreadable result.json files are left out
    and listed in `skipped` ([(path, why)]) when given."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "result.json"), recursive=True)):
        try:
            with open(path) as f:
                r = json.load(f)
            if not isinstance(r, dict) or not isinstance(r.get("accuracy"), dict):
                raise ValueError("no accuracy entry")
            dataset = r["dataset"]
            if dataset == "folder":
                dataset = "folder:" + os.path.basename(os.path.normpath(
                    (r.get("config") or {}).get("benchmark", {}).get("dataset_dir") or "?"))
            key = (r["setting"], r["method"] + (r.get("tag") or ""), dataset, r["shots"])
        except (OSError, ValueError, KeyError) as e:
            if skipped is not None:
                skipped.append((path, f"{type(e).__name__}: {e}"))
            continue
        r["path"] = r.setdefault("run_dir", os.path.dirname(path))
        groups.setdefault(key, []).append(r)
    return groups


def b2n_table(groups):
    """{method: {"rows": {dataset: dict(base, base_std, new, new_std, hm, seeds)}, "average": {...}}}."""
    tables = {}
    for (setting, method, dataset, shots), runs in sorted(groups.items()):
        if setting != "b2n":
            continue
        base = mean_std([r["accuracy"]["base"] for r in runs])
        new = mean_std([r["accuracy"]["new"] for r in runs])
        tables.setdefault(method, {"rows": {}})["rows"][dataset] = dict(
            base=base[0], base_std=base[1], new=new[0], new_std=new[1], hm=hm(base[0], new[0]),
            seeds=sorted(r["seed"] for r in runs))
    for t in tables.values():
        b = statistics.fmean(row["base"] for row in t["rows"].values())
        n = statistics.fmean(row["new"] for row in t["rows"].values())
        t["average"] = dict(base=b, new=n, hm=hm(b, n), datasets=len(t["rows"]))
    return tables


def fewshot_table(groups):
    """{method: {dataset: {shots: (mean, std, seeds)}}} plus an "average" pseudo-dataset per shot count."""
    tables = {}
    for (setting, method, dataset, shots), runs in sorted(groups.items()):
        if setting != "fewshot":
            continue
        m, s = mean_std([r["accuracy"]["all"] for r in runs])
        tables.setdefault(method, {}).setdefault(dataset, {})[shots] = (m, s, sorted(r["seed"] for r in runs))
    for t in tables.values():
        shots = sorted({k for rows in t.values() for k in rows})
        t["average"] = {k: (statistics.fmean(rows[k][0] for rows in t.values() if k in rows), 0.0, [])
                        for k in shots}
    return tables


def split_table(groups):
    """Accuracies on a benchmark's further test splits (the toy's test_corr keeps the training's class-scene
    link): one row per (setting, method, dataset, shots, classes, split) with the test and further split's mean ±
    std over seeds and the gap (further minus test, per seed, then mean ± std). -> (markdown lines, csv rows)."""
    md, rows = [], []
    for (setting, method, dataset, shots), runs in sorted(groups.items()):
        keys = sorted({k for r in runs for k in r["accuracy"] if k.partition("_")[0] in ("base", "new", "all")
                       and k.partition("_")[2]})
        for k in keys:
            subset, _, split = k.partition("_")
            both = [r for r in runs if k in r["accuracy"] and subset in r["accuracy"]]
            test, other = (mean_std([r["accuracy"][x] for r in both]) for x in (subset, k))
            gap = mean_std([r["accuracy"][k] - r["accuracy"][subset] for r in both])
            md.append(f"| {method} | {dataset} | {setting} | {shots} | {subset} | {test[0]:.2f} ± {test[1]:.2f} | "
                      f"test_{split} | {other[0]:.2f} ± {other[1]:.2f} | {gap[0]:+.2f} ± {gap[1]:.2f} | "
                      f"{len(both)} |")
            rows.append([f"{setting}:test_{split}", method, dataset, shots, subset, f"{test[0]:.4f}",
                         f"{test[1]:.4f}", f"{other[0]:.4f}", f"{other[1]:.4f}", f"{gap[0]:.4f}", f"{gap[1]:.4f}",
                         " ".join(str(r["seed"]) for r in both)])
    if md:
        md = ["", "## Further test splits (gap: its accuracy minus the test split's, per seed; mean ± std over seeds)",
              "", "| method | dataset | setting | shots | classes | test | split | accuracy | gap | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|", *md, ""]
    return md, rows


def render(tables_b2n, tables_fs, flagged=()):
    """Markdown text and CSV rows of both tables; cells of `flagged` (setting, method, dataset, shots) get a ⚠."""
    warn = lambda setting, method, dataset, shots=None: " ⚠" if any(  # noqa: E731
        f[:3] == (setting, method, dataset) and shots in (None, f[3]) for f in flagged) else ""
    header = ["table", "method", "dataset", "shots", "base", "base_std", "new", "new_std", "hm", "acc", "acc_std",
              "seeds"]
    md, rows = [], [header]
    if tables_b2n:
        md += ["## Base-to-novel (mean over seeds; HM of the means)", "",
               "| method | dataset | base | new | HM | seeds |", "|---|---|---|---|---|---|"]
        for method, t in tables_b2n.items():
            for dataset, r in t["rows"].items():
                md.append(f"| {method} | {dataset} | {r['base']:.2f} ± {r['base_std']:.2f} | "
                          f"{r['new']:.2f} ± {r['new_std']:.2f} | {r['hm']:.2f} | {len(r['seeds'])}"
                          f"{warn('b2n', method, dataset)} |")
                rows.append(["b2n", method, dataset, 16, f"{r['base']:.4f}", f"{r['base_std']:.4f}", f"{r['new']:.4f}",
                             f"{r['new_std']:.4f}", f"{r['hm']:.4f}", "", "", " ".join(map(str, r["seeds"]))])
            a = t["average"]
            md.append(f"| {method} | **average ({a['datasets']})** | {a['base']:.2f} | {a['new']:.2f} | "
                      f"{a['hm']:.2f} | |")
            rows.append(["b2n", method, "average", 16, f"{a['base']:.4f}", "", f"{a['new']:.4f}", "",
                         f"{a['hm']:.4f}", "", "", ""])
        md.append("")
    if tables_fs:
        shots = sorted({k for t in tables_fs.values() for rows in t.values() for k in rows})
        md += ["## Few-shot accuracy (all classes; mean ± std over seeds, number of seeds in brackets)", "",
               "| method | dataset | " + " | ".join(f"{k} shot{'s' if k != 1 else ''}" for k in shots) + " |",
               "|---|---|" + "---|" * len(shots)]
        for method, t in tables_fs.items():
            for dataset, r in t.items():
                cells = [(f"{r[k][0]:.2f} ± {r[k][1]:.2f} ({len(r[k][2])}){warn('fewshot', method, dataset, k)}"
                          if dataset != "average" else f"**{r[k][0]:.2f}**")
                         if k in r else "" for k in shots]
                md.append(f"| {method} | {dataset} | " + " | ".join(cells) + " |")
                for k in shots:
                    if k in r:
                        rows.append(["fewshot", method, dataset, k, "", "", "", "", "", f"{r[k][0]:.4f}",
                                     f"{r[k][1]:.4f}", " ".join(map(str, r[k][2]))])
        md.append("")
    return "\n".join(md), rows


# one row per run, and seeds that look collapsed (PromptKD#22: "model-best" at epoch 1 for two seeds, up to 33
# points off). A run is flagged when one of its accuracies (base, new; all) is more than COLLAPSE_POINTS below
# the mean of the cell's other seeds, or, with at least two other seeds, more than COLLAPSE_STD of their standard
# deviations and at least COLLAPSE_MIN_GAP points below it (so seeds that agree to 0.1 do not flag a 0.5-point
# dip); or when model selection picked the first of several epochs; or when a trained run is more than
# runs.ZERO_SHOT_MARGIN points below zero-shot CLIP on the same test images (result.json's zero_shot_reference).
COLLAPSE_POINTS, COLLAPSE_STD, COLLAPSE_MIN_GAP = 10.0, 3.0, 1.0


IDENTITY_KEYS = ("method", "dataset", "setting", "shots", "seed", "subsample", "tag", "data_fraction")


def collapse_flags(groups):
    """{run folder: [reason, ...]} of the runs that look collapsed (see COLLAPSE_POINTS)."""
    flags = {}
    for runs in groups.values():
        metrics = sorted({k for r in runs for k, v in r["accuracy"].items()
                          if k != "hm" and isinstance(v, (int, float))})
        for i, r in enumerate(runs):
            why = []
            for m in metrics:
                others = [o["accuracy"][m] for j, o in enumerate(runs) if j != i and m in o["accuracy"]]
                if m not in r["accuracy"] or not others:
                    continue
                v, mu = r["accuracy"][m], statistics.fmean(others)
                sd = statistics.stdev(others) if len(others) > 1 else 0.0
                if mu - v > COLLAPSE_POINTS:
                    why.append(f"{m} {v:.2f} is {mu - v:.1f} points below the other seeds' mean {mu:.2f}")
                elif len(others) > 1 and sd > 0 and mu - v > COLLAPSE_STD * sd and mu - v >= COLLAPSE_MIN_GAP:
                    why.append(f"{m} {v:.2f} is {(mu - v) / sd:.1f} std below the other seeds' {mu:.2f} ± {sd:.2f}")
            epochs = (r.get("config") or {}).get("epochs") or 0
            if r.get("selected_epoch") == 0 and epochs > 1:
                why.append(f"model selection picked the first of {epochs} epochs")
            if r.get("method") != "zsclip" and epochs and r.get("zero_shot_reference"):
                why += [f"{k} {a:.2f} is {z - a:.1f} points below zero-shot CLIP's {z:.2f} on the same images"
                        for k, a, z in below_zero_shot(r["accuracy"], r["zero_shot_reference"])]
            if why:
                flags[r["run_dir"]] = why
    return flags


def changed_keys(result):
    """{key: value} of the run's config keys that differ from what train.py resolves for its method, dataset and
    setting without --key flags (COMMON, the model's defaults, RECIPES, DATASET_OVERRIDES); None when unknown."""
    cfg = result.get("config") or {}
    try:
        base = recipes.resolve_config(cfg["method"], cfg["dataset"], {k: cfg[k] for k in (
            "subsample", "setting", "shots", "host", "data_fraction") if k in cfg}, cfg.get("root"))
    except (ConfigError, KeyError):
        return None
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples in code, lists in JSON)
    out = {k: cfg[k] for k, v in base.items() if k not in IDENTITY_KEYS and k in cfg and norm(cfg[k]) != norm(v)
           and not (k == "template" and v == "")}  # "" = the folder dataset's own template
    default_host = dapt.METHODS[cfg["method"]].defaults.get("host")
    if cfg.get("host", default_host) != default_host:
        out["host"] = cfg["host"]
    return out


def run_rows(groups, flags):
    """runs.csv: one row per run: identity, accuracies, seconds, selected epoch, the collapse flag, the changed
    keys as one text column and a column config.<key> per key changed in any run (every run's value in it)."""
    runs = [r for key in sorted(groups) for r in sorted(groups[key], key=lambda r: r["seed"])]
    changed = {r["run_dir"]: changed_keys(r) for r in runs}
    keys = sorted({k for c in changed.values() if c for k in c})
    accs = [k for k in ("base", "new", "hm", "all") if any(k in r["accuracy"] for r in runs)]
    accs += sorted({k for r in runs for k in r["accuracy"]} - set(accs))
    rows = [["run", "method", "tag", "dataset", "setting", "shots", "seed", "subsample", *accs, "seconds",
             "selected_epoch", "epochs", "possible_collapse", "changed", *[f"config.{k}" for k in keys]]]
    for r in runs:
        cfg, c = r.get("config") or {}, changed[r["run_dir"]]
        rows.append([r["run_dir"], r["method"], r.get("tag", ""), r["dataset"], r["setting"], r["shots"], r["seed"],
                     r.get("subsample", ""), *[f"{r['accuracy'][k]:.4f}" if k in r["accuracy"] else "" for k in accs],
                     r.get("seconds", ""), r.get("selected_epoch", ""), cfg.get("epochs", ""),
                     "; ".join(flags.get(r["run_dir"], [])),
                     "?" if c is None else " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in c.items()),
                     *[json.dumps(cfg[k], default=str) if k in cfg else "" for k in keys]])
    return rows


def table(root, out=None):
    skipped = []
    groups = collect(root, skipped)
    for path, why in skipped:
        print(f"warning: {path} is not a readable result ({why}): left out of the tables (run the run's command "
              "again with --resume to evaluate it)", file=sys.stderr)
    if not groups:
        raise RunError(f"no result.json below {root}: train runs first (python train.py ...)")
    b2n, fs = b2n_table(groups), fewshot_table(groups)
    flags = collapse_flags(groups)
    md, rows = render(b2n, fs, {key for key, runs in groups.items() if any(r["run_dir"] in flags for r in runs)})
    split_md, split_rows = split_table(groups)
    md += "\n".join(split_md)
    if flags:
        md += "\n".join(["", "## Possible collapses (a seed far below the others, or model selection at the first "
                         "epoch)", ""] + [f"- `{d}`: " + "; ".join(why) for d, why in sorted(flags.items())] + [""])
    flagged = [f"{r['path']} ({', '.join(r['flags'])})" for runs in groups.values() for r in runs if r.get("flags")]
    if flagged:  # kept in the means, but never silently
        md += (f"\nFlagged runs (included above; see the warnings in their result.json): {len(flagged)}\n"
               + "\n".join(f"- {f}" for f in flagged) + "\n")
    if skipped:
        md += (f"\nUnreadable result.json files (left out of the tables): {len(skipped)}\n"
               + "\n".join(f"- {p} ({why})" for p, why in skipped) + "\n")
    print(md)
    out = out or root
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        csv.writer(f).writerows(run_rows(groups, flags))
    if split_rows:
        with open(os.path.join(out, "table_splits.csv"), "w", newline="") as f:
            csv.writer(f).writerows([["table", "method", "dataset", "shots", "subset", "test", "test_std", "split",
                                      "split_std", "gap", "gap_std", "seeds"], *split_rows])
    print(f"wrote {os.path.join(out, 'table.md')}, table.csv, runs.csv (one row per run)"
          + (" and table_splits.csv" if split_rows else ""))
    return b2n, fs


# ----------------------------------------------------------------------------------------------------------
# paired comparisons: `python eval.py compare A B`, seed by seed


def t_quantile(p, df):
    """The p quantile of Student's t with df degrees of freedom (bisection on its CDF, Simpson's rule on the
    density; accurate to 1e-6 for p in [0.5, 0.9999])."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(t, n=2000):
        h = t / n
        return 0.5 + h / 3 * sum(density(i * h) * (1 if i in (0, n) else 4 if i % 2 else 2) for i in range(n + 1))
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


BOOTSTRAP_MIN_SEEDS, BOOTSTRAP_RESAMPLES = 8, 10000


def paired(diffs):
    """Statistics of per-seed differences: mean, std, 95 % Student-t interval, a 95 % percentile bootstrap interval
    of the mean (10,000 resamples, generator seed 0) when there are >= 8 seeds, and the seeds whose difference has
    the mean's sign. One seed: no interval."""
    n, mean = len(diffs), statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    boot = (math.nan, math.nan)
    if n >= BOOTSTRAP_MIN_SEEDS:
        rng = np.random.default_rng(0)
        means = np.asarray(diffs)[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(1)
        boot = tuple(float(x) for x in np.percentile(means, [2.5, 97.5]))
    sign = (mean > 0) - (mean < 0)
    agree = sum(((d > 0) - (d < 0)) == sign for d in diffs) if sign else sum(d == 0 for d in diffs)
    return dict(n=n, mean=mean, std=sd, t_low=mean - half, t_high=mean + half, boot_low=boot[0], boot_high=boot[1],
                agree=agree)


def verdict(stats, a, b):
    """"a > b", "a < b" or "no measurable difference" (the 95 % t interval includes 0, or one seed)."""
    if not stats["n"] > 1 or stats["t_low"] <= 0 <= stats["t_high"]:
        return "no measurable difference"
    return f"{a} > {b}" if stats["mean"] > 0 else f"{a} < {b}"


def run_metrics(result):
    """{metric: value} of one result: its accuracies (base, new, hm, all, base_corr, ...) and the context gaps
    <subset>_gap = accuracy on the further split minus on test (the toy's test_corr - test)."""
    acc = {k: v for k, v in result["accuracy"].items() if isinstance(v, (int, float))}
    gaps = {f"{k.partition('_')[0]}_gap": v - acc[k.partition("_")[0]] for k, v in acc.items()
            if "_" in k and k.partition("_")[0] in acc}
    return {**acc, **gaps}


def side(pattern, seeds=None):
    """The finished runs a compare side names: a glob of run folders (runs/b2n/toy/maple/shots16_seed*), or
    ROOT:METHOD (every run of method+tag METHOD below ROOT, one table row). -> (label, {(setting, dataset, shots):
    {seed: result}})."""
    root, _, method = pattern.rpartition(":") if ":" in pattern and not os.path.exists(pattern) else ("", "", "")
    if method:
        dirs = [os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "result.json"), recursive=True)]
    else:
        dirs = [d for d in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(os.path.join(d, "result.json"))]
    rows, labels = {}, set()
    for d in sorted(dirs):
        r = read_result(d)
        if r is None or (method and r["method"] + (r.get("tag") or "") != method):
            continue
        if seeds and r["seed"] not in seeds:
            continue
        labels.add(r["method"] + (r.get("tag") or ""))
        cell = rows.setdefault((r["setting"], r["dataset"], r["shots"]), {})
        if r["seed"] in cell:
            raise RunError(f"{pattern}: two runs of seed {r['seed']} in one cell ({cell[r['seed']]['run_dir']} and "
                           f"{d}); narrow the pattern")
        cell[r["seed"]] = dict(r, run_dir=d)
    if not rows:
        raise RunError(f"{pattern}: no finished run (result.json) matches; give a glob of run folders or ROOT:METHOD")
    return " + ".join(sorted(labels)), rows


def compare(a, b, seeds=None, out=None, echo=print):
    """Paired comparison of two sides (see `side`), cell by cell (setting, dataset, shots) and metric: each side's
    mean ± std over seeds, the per-seed difference a - b, its mean with a 95 % Student-t interval (and a bootstrap
    interval with >= 8 seeds), how many seeds agree in sign, and a verdict. Seeds must pair: a seed on one side only
    is an error naming it. -> CSV rows (also written to `out`)."""
    (la, A), (lb, B) = side(a, seeds), side(b, seeds)
    cells = sorted(set(A) & set(B))
    if not cells:
        raise RunError(f"{a} and {b} share no (setting, dataset, shots) cell: nothing to compare")
    header = ["setting", "dataset", "shots", "metric", "a", "a_mean", "a_std", "b", "b_mean", "b_std", "seeds",
              "diff_mean", "diff_std", "t95_low", "t95_high", "boot95_low", "boot95_high", "agree", "verdict",
              "diffs"]
    rows = [header]
    for cell in cells:
        sa, sb = A[cell], B[cell]
        if set(sa) != set(sb):
            only = lambda x, y: ", ".join(map(str, sorted(set(x) - set(y)))) or "none"  # noqa: E731
            raise RunError(f"{'/'.join(map(str, cell))}: seeds do not pair: only in {la}: {only(sa, sb)}; only in "
                           f"{lb}: {only(sb, sa)} (train the missing runs, or pass --seeds)")
        order = sorted(sa)
        ma, mb = {s: run_metrics(sa[s]) for s in order}, {s: run_metrics(sb[s]) for s in order}
        metrics = [m for m in ma[order[0]] if all(m in ma[s] and m in mb[s] for s in order)]
        echo(f"\n{la} vs {lb}: {cell[0]}, {cell[1]}, {cell[2]} shots, seeds {', '.join(map(str, order))} "
             "(difference = first - second; 95 % intervals)")
        for m in metrics:
            va, vb = [ma[s][m] for s in order], [mb[s][m] for s in order]
            st = paired([x - y for x, y in zip(va, vb)])
            (am, asd), (bm, bsd) = mean_std(va), mean_std(vb)
            boot = f", bootstrap [{st['boot_low']:+.2f}, {st['boot_high']:+.2f}]" if not math.isnan(st["boot_low"]) \
                else ""
            ci = f"t [{st['t_low']:+.2f}, {st['t_high']:+.2f}]" if st["n"] > 1 else "one seed: no interval"
            echo(f"  {m:<9} {am:6.2f} ± {asd:5.2f}  vs {bm:6.2f} ± {bsd:5.2f}   diff {st['mean']:+6.2f} ± "
                 f"{st['std']:.2f} ({ci}{boot}; {st['agree']} of {st['n']} seeds agree): {verdict(st, la, lb)}")
            rows.append([*cell, m, la, f"{am:.4f}", f"{asd:.4f}", lb, f"{bm:.4f}", f"{bsd:.4f}",
                         " ".join(map(str, order)), f"{st['mean']:.4f}", f"{st['std']:.4f}", f"{st['t_low']:.4f}",
                         f"{st['t_high']:.4f}", f"{st['boot_low']:.4f}", f"{st['boot_high']:.4f}",
                         f"{st['agree']}/{st['n']}", verdict(st, la, lb),
                         " ".join(f"{x - y:.4f}" for x, y in zip(va, vb))])
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        echo(f"wrote {out}")
    return rows
