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
import os
import statistics

import dapt
import recipes
from prompting import ConfigError
from runs import RunError


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def hm(base, new):
    """The harmonic mean of base and new accuracy (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def collect(root):
    """Every result.json below root, grouped by (setting, method+tag, dataset, shots) -> list of results."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "result.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        r["path"] = r.setdefault("run_dir", os.path.dirname(path))
        key = (r["setting"], r["method"] + (r.get("tag") or ""), r["dataset"], r["shots"])
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
    md, rows = [], [["table", "method", "dataset", "shots", "base", "base_std", "new", "new_std", "hm", "acc", "acc_std", "seeds"]]
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
            md.append(f"| {method} | **average ({a['datasets']})** | {a['base']:.2f} | {a['new']:.2f} | {a['hm']:.2f} | |")
            rows.append(["b2n", method, "average", 16, f"{a['base']:.4f}", "", f"{a['new']:.4f}", "", f"{a['hm']:.4f}", "", "", ""])
        md.append("")
    if tables_fs:
        shots = sorted({k for t in tables_fs.values() for rows in t.values() for k in rows})
        md += ["## Few-shot accuracy (all classes; mean ± std over seeds, number of seeds in brackets)", "",
               "| method | dataset | " + " | ".join(f"{k} shots" for k in shots) + " |",
               "|---|---|" + "---|" * len(shots)]
        for method, t in tables_fs.items():
            for dataset, r in t.items():
                cells = [(f"{r[k][0]:.2f} ± {r[k][1]:.2f} ({len(r[k][2])}){warn('fewshot', method, dataset, k)}"
                          if dataset != "average" else f"**{r[k][0]:.2f}**")
                         if k in r else "" for k in shots]
                md.append(f"| {method} | {dataset} | " + " | ".join(cells) + " |")
                for k in shots:
                    if k in r:
                        rows.append(["fewshot", method, dataset, k, "", "", "", "", "", f"{r[k][0]:.4f}", f"{r[k][1]:.4f}",
                                     " ".join(map(str, r[k][2]))])
        md.append("")
    return "\n".join(md), rows


# one row per run, and seeds that look collapsed (PromptKD#22: "model-best" at epoch 1 for two seeds, up to 33
# points off). A run is flagged when one of its accuracies (base, new; all) is more than COLLAPSE_POINTS below
# the mean of the cell's other seeds, or, with at least two other seeds, more than COLLAPSE_STD of their standard
# deviations and at least COLLAPSE_MIN_GAP points below it (so seeds that agree to 0.1 do not flag a 0.5-point
# dip); or when model selection picked the first of several epochs.
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
    groups = collect(root)
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
