"""The one-shot GPU report (python -m kernels.bench --report), checked on the CPU with small shapes: its hard
budget (a table stops when its time is up and names what it skipped), its files rewritten after every table (a
crash keeps the tables measured before it), and the key masks of its attention table (DAPT's token views from
the toy masks beside the half-hidden mask). Its kernel checks: tests/test_kernels.py (CPU), test_gpu_kernels.py.
"""
import json
import os

import pytest
import torch

from kernels import bench
from kernels.attention import visible_key_blocks


def report(out, *argv):
    """bench.main(--report --small --device cpu --out out ...): -> (the tables, {title: table} of the JSON file)."""
    tables, paths = bench.main(["--report", "--small", "--device", "cpu", "--reps", "1", "--out", str(out), *argv])
    with open(paths[1]) as f:
        written = json.load(f)
    assert os.path.isfile(paths[0]) and paths[0].endswith(".md")
    return tables, {t["title"]: t for t in written["tables"]}


def test_a_spent_budget_skips_every_table_and_says_what(tmp_path):
    tables, written = report(tmp_path, "--budget", "0")
    notes = {row[0]: row[-1] for t in written.values() for row in t["rows"]}
    assert len(tables) == len(written)
    for shape in ("L=197+2, DAPT token views", "L=197+16, half hidden", "batch 32, 100 classes",
                  "text side, 100 classes", "coop", "mmrl"):
        assert notes[shape].startswith("skipped: the 0 s budget is spent"), (shape, notes.get(shape))


def test_a_budget_stops_a_table_midway(tmp_path, monkeypatch):
    """A budget that runs out inside the attention table: the rows and shapes after that point are skipped, each
    named, and the tables after it too; what was measured before stays."""
    clock = iter(range(0, 10**6, 7))  # every look at the budget's clock: 7 s later
    monkeypatch.setattr(bench.Budget, "clock", staticmethod(lambda: float(next(clock))))
    _, written = report(tmp_path, "--budget", "120")
    rows = [row for t in written.values() for row in t["rows"]]
    timed = [r for r in rows if r[1] not in ("-", "")]
    skipped = [r for r in rows if str(r[-1]).startswith("skipped: the 120 s budget is spent")]
    assert timed and skipped
    assert any(r[0] == "torch eager (reference)" for r in timed)
    assert [r for r in skipped if r[0] in ("coop", "mmrl")]  # the train-step table never started


def test_the_files_are_written_after_every_table(tmp_path, monkeypatch):
    """A crash in the losses table: the Markdown and JSON already hold the check and every attention table."""
    def crash(*a, **k):
        raise RuntimeError("a crash in the third table")

    monkeypatch.setattr(bench, "bench_losses", crash)
    with pytest.raises(RuntimeError, match="third table"):
        bench.main(["--report", "--small", "--device", "cpu", "--reps", "1", "--out", str(tmp_path)])
    [md] = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    [js] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / js) as f:
        titles = [t["title"] for t in json.load(f)["tables"]]
    assert titles[0].startswith("kernels against their references")
    assert sum(t.startswith("attention fwd+bwd") for t in titles) == 6  # 3 lengths x 2 masks
    assert "DAPT token views" in (tmp_path / md).read_text()


def test_dapt_view_masks_are_shaped_like_dapt_foregrounds():
    """Per image the full view, the foreground and the background: CLS and prompts visible in all three, the
    foreground a centred toy object over 25-60 % of the 14 x 14 patches, the background its complement. Hardly any
    64-key block is fully hidden (what the kernel can skip), unlike the half-hidden mask's 12.5 %."""
    masks, fg = bench.dapt_view_masks(16, 8)
    assert masks.shape == (48, 1 + 196 + 8) and masks.dtype == torch.bool
    full, front, back = masks.chunk(3)
    assert full.all() and front[:, 0].all() and back[:, 0].all() and front[:, 197:].all() and back[:, 197:].all()
    assert not (front[:, 1:197] & back[:, 1:197]).any() and (front[:, 1:197] | back[:, 1:197]).all()
    assert ((fg >= 0.25) & (fg <= 0.60)).all() and fg.std() > 0.02  # varied objects, within the range
    grid = front[:, 1:197].view(16, 14, 14).float()
    assert grid[:, 5:9, 5:9].mean() > 0.9 and grid[:, 0, :].mean() < 0.1  # centred: the middle in, the edge out
    skip = lambda m: 1 - visible_key_blocks(m, 64)[1][:, -1].float().mean().item() / 4  # noqa: E731
    assert skip(masks) < 0.05 and skip(bench.half_hidden_masks(48, 8)) == pytest.approx(0.125)
