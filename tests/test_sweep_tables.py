"""Tables with one row per run and collapse flags (eval.py table), plan files and sweeps (python sweep.py PLAN): the
grid syntax, skipping finished runs, resuming unfinished ones, a failed run not stopping the table, and every
shipped plan resolving to valid runs. GPUs per job and clusters: test_sweep_cluster.py."""
import csv
import glob
import os

import pytest

import eval as evaluation
import train
import recipes
import runs
import sweep
from conftest import cli_error, run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(root, method, dataset, seed, accuracy, setting="b2n", shots=16, selected_epoch=None, **changed):
    subsample = "base" if setting == "b2n" else "all"
    cfg = recipes.resolve_config(method, dataset, {"subsample": subsample, "shots": shots})
    cfg.update(changed, seed=seed)
    d = run_folder(root, method, "--seed", str(seed), dataset=dataset, subsample=subsample, shots=shots)
    os.makedirs(d)
    runs.write_json(os.path.join(d, "result.json"), dict(
        method=method, dataset=dataset, setting=setting, shots=shots, seed=seed, tag="", subsample=cfg["subsample"],
        accuracy=accuracy, config=dict(cfg, root="/data", device="cpu"), seconds=12.5 * seed,
        selected_epoch=cfg["epochs"] - 1 if selected_epoch is None else selected_epoch))
    return d


def test_table_counts_seeds_writes_run_rows_and_flags_collapses(tmp_path, capsys):
    r = str(tmp_path)
    b2n = [fake_run(r, "coop", "dtd", s, dict(base=b, new=n, hm=0.0)) for s, b, n in ((1, 80.0, 60.0), (2, 81.0, 61.0),
                                                                                         (3, 82.0, 45.5))]
    fs = [fake_run(r, "coop", "eurosat", s, dict(all=a), setting="fewshot", shots=4, lr=lr)
          for s, a, lr in ((1, 80.0, 0.002), (2, 80.1, 0.05), (3, 79.0, 0.002))]  # seed 3: 1.05 below, others agree
    calm = [fake_run(r, "coop", "eurosat", s, dict(all=a), setting="fewshot", shots=1)
            for s, a in ((1, 70.0), (2, 70.2), (3, 69.8))]
    early = fake_run(r, "dapt", "dtd", 1, dict(base=80.0, new=70.0, hm=0.0), selected_epoch=0)
    evaluation.main(["table", r])
    md = open(tmp_path / "table.md").read()
    assert "| coop | dtd | 81.00 ± 1.00 | 55.50 ± 8.67 |" in md and "| 3 ⚠ |" in md
    assert "70.00 ± 0.20 (3) |" in md and "79.70 ± 0.61 (3) ⚠" in md  # K = 1 calm, K = 4 flagged
    flagged = md.split("## Possible collapses")[1]
    assert b2n[2] in flagged and "new 45.50 is 15.0 points below" in flagged
    assert fs[2] in flagged and "std below" in flagged
    assert early in flagged and "first of 5 epochs" in flagged
    assert not any(d in flagged for d in b2n[:2] + fs[:2] + calm)
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {row["run"] for row in rows} == set(b2n + fs + calm + [early])
    row = {x["run"]: x for x in rows}
    assert row[fs[1]]["changed"] == "lr=0.05" and row[fs[1]]["config.lr"] == "0.05"
    assert row[fs[0]]["config.lr"] == "0.002"
    assert row[fs[0]]["changed"] == "" and row[b2n[2]]["new"] == "45.5000" and row[b2n[2]]["seconds"] == "37.5"
    assert row[early]["selected_epoch"] == "0" and row[early]["epochs"] == "5" and row[early]["possible_collapse"]
    assert "runs.csv" in capsys.readouterr().out


def test_plan_grid_syntax():
    text = """# a comment
    DATASETS = {caltech101,dtd}
    R = --subsample base --seed {1,2}   # seeds
    --method coop --dataset $DATASETS $R --tag -a
    --method fvgpt --dataset ${DATASETS} \\
        --host-run {out}/b2n/{dataset}/coop/shots16_seed{seed} --seed 3 --template "a {} photo."
    """
    runs = sweep.expand_plan(text, out="OUT")
    assert [n for n, _ in runs] == [4] * 4 + [5] * 2
    assert runs[0][1] == ["--method", "coop", "--dataset", "caltech101", "--subsample", "base", "--seed", "1",
                          "--tag", "-a"]
    assert [t[t.index("--dataset") + 1] + t[t.index("--seed") + 1] for _, t in runs[:4]] == \
        ["caltech1011", "caltech1012", "dtd1", "dtd2"]  # the leftmost group varies slowest
    assert runs[5][1][4:] == ["--host-run", "OUT/b2n/dtd/coop/shots16_seed3", "--seed", "3", "--template",
                              "a {} photo."]
    with pytest.raises(recipes.ConfigError, match="plan:1: \\$NOPE"):
        sweep.expand_plan("--method coop --dataset $NOPE")
    with pytest.raises(train.ConfigError, match="--shots, which this line"):
        sweep.expand_plan("--method coop --dataset toy --tag k{shots}")


@pytest.mark.parametrize("plan", sorted(glob.glob(os.path.join(REPO, "plans", "*.txt"))), ids=os.path.basename)
def test_shipped_plans_resolve(plan, tmp_path):
    """Every line of every shipped plan is valid train.py arguments with a distinct run folder."""
    lines = []
    stats = sweep.sweep(plan, out=str(tmp_path / "runs"), dry_run=True, echo=lines.append)
    assert stats["done"] == stats["trained"] == 0 and not stats["failed"] and len(lines) > 2
    assert not os.path.exists(tmp_path / "runs")


def test_sweep_skips_finished_resumes_unfinished_and_survives_a_failure(random_toy, tmp_path, capsys):
    root, clip_path = random_toy
    plan = tmp_path / "plan.txt"
    plan.write_text(f"R = --dataset toy --subsample base --shots 4 --clip {clip_path} --epochs 1 --warmup-epochs 0 "
                    "--log-every 1000 --batch 8\n"
                    "--method {zsclip,coop} $R --seed {1,2}\n")
    out = str(tmp_path / "runs")
    lines = []
    stats = sweep.sweep(str(plan), out=out, root=root, device="cpu", echo=lines.append)
    assert stats["trained"] == 4 and not stats["failed"]
    assert lines[1].startswith("[1/4] ") and "trained in" in lines[1] and "ETA" in lines[1] and "3 to go" in lines[1]
    assert "0 to go, ETA 0:00:00" in lines[4] and os.path.isfile(os.path.join(out, "sweep.log"))
    lines.clear()
    assert sweep.sweep(str(plan), out=out, root=root, echo=lines.append)["done"] == 4
    assert all(ln.endswith(": done") for ln in lines[1:5])
    # an unfinished run (result.json lost): skipped without --resume, continued with it
    unfinished = run_folder(out, "coop", "--seed", "2")
    os.remove(os.path.join(unfinished, "result.json"))
    lines.clear()
    stats = sweep.sweep(str(plan), out=out, root=root, echo=lines.append)
    assert stats["skipped"] == 1 and "pass --resume" in lines[4]
    lines.clear()
    stats = sweep.sweep(str(plan), out=out, root=root, resume=True, echo=lines.append)
    assert stats["trained"] == 1 and "resumed in" in lines[4]
    assert os.path.isfile(os.path.join(unfinished, "result.json"))
    # a run that fails does not stop the others; the command exits 1 naming it
    plan.write_text(plan.read_text() + "--method fvgpt $R --seed 1 --host-run nowhere\n"
                                       "--method coop $R --seed 3\n")
    with pytest.raises(SystemExit) as e:
        sweep.sweep_main([str(plan), "--out", out, "--root", root])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "FAILED (ConfigError: fvgpt needs --host-run" in captured.out and "[6/6]" in captured.out
    assert os.path.isfile(os.path.join(run_folder(out, "coop", "--seed", "3"), "result.json"))
    assert "1 run(s) failed" in captured.err
    # a line that cannot be read stops the sweep before anything runs
    plan.write_text("--method coop --dataset toy --lr fast\n")
    code, err = cli_error(capsys, sweep.sweep_main, [str(plan), "--out", out])
    assert code == 1 and "plan.txt:1: --lr: cannot read 'fast'" in err


def test_sweep_jobs_runs_processes_in_dependency_order(random_toy, tmp_path):
    """--jobs 2: runs in child processes (the first alone, then two at a time); FVG-PT waits for the host run its
    --host-run names, and fails with a clear reason when that host failed; results equal an in-process sweep's."""
    root, clip_path = random_toy
    plan = tmp_path / "plan.txt"
    r = f"--dataset toy --subsample base --shots 2 --clip {clip_path} --epochs 1 --log-every 1000 --batch 8"
    plan.write_text(f"R = {r}\n"
                    "--method coop $R --seed 1 --ctx-init '' --tag -fvg\n"
                    "--method fvgpt $R --seed 1 --host-run {out}/b2n/toy/coop-fvg/shots2_seed1\n"
                    "--method zsclip $R --seed {1,2}\n"
                    "--method coop $R --seed 2 --clip {root}/missing.pt --tag -bad\n"
                    "--method fvgpt $R --seed 2 --host-run {out}/b2n/toy/coop-bad/shots2_seed2 --tag -on-bad\n")
    out, lines = str(tmp_path / "par"), []
    stats = sweep.sweep(str(plan), out=out, root=root, device="cpu", echo=lines.append, jobs=2)
    assert stats["trained"] == 4 and len(stats["failed"]) == 2, stats
    host, fvg = run_folder(out, "coop", "--tag", "-fvg", shots=2), run_folder(out, "fvgpt", shots=2)
    assert os.path.getmtime(os.path.join(fvg, "config.json")) >= os.path.getmtime(os.path.join(host, "result.json"))
    assert "2 at a time" in lines[0] and any("FAILED (exit code 1" in ln and "coop-bad" in ln for ln in lines)
    assert any("fvgpt-on-bad" in ln and "a run it needs failed" in ln for ln in lines)
    bad = run_folder(out, "coop", "--tag", "-bad", "--seed", "2", shots=2)
    assert not os.path.exists(host + ".sweep.txt") and os.path.exists(bad + ".sweep.txt")
    # the same runs in this process give the same numbers
    plan.write_text(f"R = {r}\n--method coop $R --seed 1 --ctx-init '' --tag -fvg\n"
                    "--method fvgpt $R --seed 1 --host-run {out}/b2n/toy/coop-fvg/shots2_seed1\n")
    seq = str(tmp_path / "seq")
    sweep.sweep(str(plan), out=seq, root=root, device="cpu", echo=lambda m: None)
    for method, tag in (("coop", "-fvg"), ("fvgpt", "")):
        a, b = (runs.read_json(os.path.join(run_folder(o, method, "--tag", tag, shots=2), "result.json"))
                for o in (out, seq))
        assert a["accuracy"] == b["accuracy"], method + tag
