"""Evaluate saved runs and aggregate seeds into the papers' tables.

    python eval.py table runs/                          # base / new / HM and few-shot tables (Markdown + CSV)
    python eval.py run RUN_DIR --dataset oxford_pets    # cross-dataset transfer of a trained run
    python eval.py run RUN_DIR --dataset imagenetv2 imagenet_sketch imagenet_a imagenet_r   # domain shift
    python eval.py run RUN_DIR --subsample new          # re-evaluate base / new / all from the checkpoint

Tables follow protocol.md §4: per dataset, the mean (and standard deviation) over seeds; HM = 2BN/(B+N) of
the seed-averaged base and new accuracies; the average row averages base and new over datasets first and
takes the HM of those two averages (as the papers do), not the mean of per-dataset HMs.
Deliberately not here: training (train.py), attention maps (a later addition).
"""
import argparse
import csv
import glob
import json
import os
import statistics
import sys

import torch

import data
import train


# ----------------------------------------------------------------------------------------------------------
# evaluating one run on other classes / datasets


def load_run(run_dir, device="cpu", root=None):
    """(model, cfg, root) rebuilt from a run folder's checkpoint (learnable parameters + config), read with
    weights_only=True (train.read_run_file: a planted file cannot run code)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise train.RunError(f"{run_dir}: no checkpoint.pt (is this a run folder of train.py, and did it finish an epoch?)")
    ckpt = train.read_run_file(path, device)
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or not isinstance(ckpt.get("classnames"), list):
        raise train.RunError(f"{path}: holds no run config and class names; expected the checkpoint.pt of train.py")
    root = root or train.read_json(os.path.join(run_dir, "config.json"), "run config")["root"]
    clip = train.load_backbone(cfg, root, device)
    model = train.build_model(cfg, clip, ckpt["classnames"]).to(device)
    train.restore(model, ckpt, path)
    return model, cfg, root


def evaluate_run(run_dir, datasets=None, subsample="all", root=None, device="cpu"):
    """Accuracy of a trained run on the test split of each dataset (default: its own), with the classes of
    `subsample`; written to run_dir/eval_<dataset>_<subsample>.json and returned as {dataset: acc}. Runs with
    the run's thread count (config key threads)."""
    config = os.path.join(run_dir, "config.json")
    threads = train.read_json(config, "run config").get("threads", 0) if os.path.exists(config) else 0
    with train.torch_threads(threads):
        return _evaluate_run(run_dir, datasets, subsample, root, device)


def _evaluate_run(run_dir, datasets, subsample, root, device):
    model, cfg, root = load_run(run_dir, device, root)
    _, _, autocast_dtype, _ = train.precision_of(cfg, device)
    out = {}
    for name in datasets or [cfg["dataset"]]:
        bench = data.load_benchmark(name, root, shots=cfg["shots"], seed=cfg["seed"], subsample=subsample)
        model.set_dataset(name)  # MMRL: the dataset's template and prediction rule
        model.set_classnames(bench.classnames)
        _, test_tf = train.transforms_of(cfg, bench, model.clip.visual.input_resolution)
        loader = train.make_loader(dict(cfg, workers=cfg["workers"]), bench, bench.test, test_tf, False, model,
                                   model.clip.visual.patch_size)
        acc, n = train.evaluate(model, loader, device, autocast_dtype)
        record = dict(run=run_dir, method=cfg["method"], trained_on=cfg["dataset"], dataset=name, subsample=subsample,
                      seed=cfg["seed"], shots=cfg["shots"], accuracy=acc, images=n)
        train.write_json(os.path.join(run_dir, f"eval_{name}_{subsample}.json"), record)
        print(f"{run_dir}: {name} ({subsample}) {acc:.2f}% on {n} images")
        out[name] = acc
    return out


# ----------------------------------------------------------------------------------------------------------
# aggregating seeds


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(root):
    """Every result.json below root, grouped by (setting, method+tag, dataset, shots) -> list of results."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "result.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        r["path"] = os.path.dirname(path)
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
            base=base[0], base_std=base[1], new=new[0], new_std=new[1], hm=train.hm(base[0], new[0]),
            seeds=sorted(r["seed"] for r in runs))
    for t in tables.values():
        b = statistics.fmean(row["base"] for row in t["rows"].values())
        n = statistics.fmean(row["new"] for row in t["rows"].values())
        t["average"] = dict(base=b, new=n, hm=train.hm(b, n), datasets=len(t["rows"]))
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


def render(tables_b2n, tables_fs):
    """Markdown text and CSV rows of both tables."""
    md, rows = [], [["table", "method", "dataset", "shots", "base", "base_std", "new", "new_std", "hm", "acc", "acc_std", "seeds"]]
    if tables_b2n:
        md += ["## Base-to-novel (mean over seeds; HM of the means)", "",
               "| method | dataset | base | new | HM | seeds |", "|---|---|---|---|---|---|"]
        for method, t in tables_b2n.items():
            for dataset, r in t["rows"].items():
                md.append(f"| {method} | {dataset} | {r['base']:.2f} ± {r['base_std']:.2f} | "
                          f"{r['new']:.2f} ± {r['new_std']:.2f} | {r['hm']:.2f} | {len(r['seeds'])} |")
                rows.append(["b2n", method, dataset, 16, f"{r['base']:.4f}", f"{r['base_std']:.4f}", f"{r['new']:.4f}",
                             f"{r['new_std']:.4f}", f"{r['hm']:.4f}", "", "", " ".join(map(str, r["seeds"]))])
            a = t["average"]
            md.append(f"| {method} | **average ({a['datasets']})** | {a['base']:.2f} | {a['new']:.2f} | {a['hm']:.2f} | |")
            rows.append(["b2n", method, "average", 16, f"{a['base']:.4f}", "", f"{a['new']:.4f}", "", f"{a['hm']:.4f}", "", "", ""])
        md.append("")
    if tables_fs:
        shots = sorted({k for t in tables_fs.values() for rows in t.values() for k in rows})
        md += ["## Few-shot accuracy (all classes; mean ± std over seeds)", "",
               "| method | dataset | " + " | ".join(f"{k} shots" for k in shots) + " |",
               "|---|---|" + "---|" * len(shots)]
        for method, t in tables_fs.items():
            for dataset, r in t.items():
                cells = [(f"{r[k][0]:.2f} ± {r[k][1]:.2f}" if dataset != "average" else f"**{r[k][0]:.2f}**")
                         if k in r else "" for k in shots]
                md.append(f"| {method} | {dataset} | " + " | ".join(cells) + " |")
                for k in shots:
                    if k in r:
                        rows.append(["fewshot", method, dataset, k, "", "", "", "", "", f"{r[k][0]:.4f}", f"{r[k][1]:.4f}",
                                     " ".join(map(str, r[k][2]))])
        md.append("")
    return "\n".join(md), rows


def table(root, out=None):
    groups = collect(root)
    if not groups:
        raise train.RunError(f"no result.json below {root}: train runs first (python train.py ...)")
    b2n, fs = b2n_table(groups), fewshot_table(groups)
    md, rows = render(b2n, fs)
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
    print(f"wrote {os.path.join(out, 'table.md')} and table.csv")
    return b2n, fs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="aggregate result.json files below a folder", allow_abbrev=False)
    t.add_argument("root")
    t.add_argument("--out", help="where table.md / table.csv go (default: the root)")
    r = sub.add_parser("run", help="evaluate trained runs on datasets / class subsets", allow_abbrev=False)
    r.add_argument("runs", nargs="+")
    r.add_argument("--dataset", nargs="*", help="target datasets (default: the run's own)")
    r.add_argument("--subsample", default="all", choices=["all", "base", "new"])
    r.add_argument("--root", help="data root (default: the one the run was trained with)")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for command in (t, r):
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "table":
            return table(args.root, args.out)
        return {run: evaluate_run(run, args.dataset, args.subsample, args.root, args.device) for run in args.runs}
    except train.USER_ERRORS as e:  # one message, no traceback (--debug shows it)
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
