"""Folder datasets, split files, images of every mode, tables, predict, sweeps and interrupted runs under bad input
and faults, as a user trusting a month of runs to them would meet them: each case ends in the right result or one
`error:` line naming the file, key or value (or a warning that reaches result.json and the end summary)."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datatools
import eval as evaluation
import loader
import runs
import sweep
import tables
import train
from conftest import cli_error, make_folder_dataset, random_clip, run_folder, train_random_toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_run(d, out, clip_path, *extra):
    """One quick coop run on a folder dataset (2 shots, 1 epoch); -> its result."""
    return train.main(["--method", "coop", "--dataset", "folder", "--root", d, "--out", str(out), "--clip", clip_path,
                       "--shots", "2", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--lr", "0.01",
                       *extra])


def fails(capsys, args, **kw):
    """train_random_toy(*args) that must fail with one clear line: -> (exit code, that line). Log lines (INFO) may
    come first; there is one error line and no traceback."""
    code, err = cli_error(capsys, lambda a: train_random_toy(*a, **kw), args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return code, errors[0]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "clip.pt")
    torch.save(random_clip().state_dict(), path)
    return path


# ---- a run is identified by its data


def test_another_folder_or_split_is_another_run(tmp_path, clip_path, capsys):
    a = make_folder_dataset(tmp_path / "a", per_class=6, masks=False)
    b = make_folder_dataset(tmp_path / "b", per_class=6, masks=False, seed=1)
    out = tmp_path / "runs"
    first = folder_run(a, out, clip_path)
    with pytest.raises(runs.RunError) as e:
        folder_run(b, out, clip_path, "--debug")
    assert "another config" in str(e.value) and f"dataset_dir {a!r} in the run, {b!r} now" in str(e.value)
    data.make_folder_split(a, seed=9, force=True)  # the same folder, a re-drawn split
    with pytest.raises(runs.RunError, match="split_sha256"):
        train.train(train.parse_args(["--method", "coop", "--dataset", "folder", "--root", a, "--out", str(out),
                                      "--clip", clip_path, "--shots", "2", "--epochs", "1", "--warmup-epochs", "0",
                                      "--workers", "0", "--lr", "0.01"]).cfg, root=a, out=str(out))
    assert json.load(open(os.path.join(first["run_dir"], "result.json")))["accuracy"] == first["accuracy"]
    # tables key a folder dataset's rows by its folder's name
    groups = tables.collect(str(out))
    assert [key[2] for key in groups] == ["folder:a"]


# ---- images of every mode Pillow opens, as a viewer shows them


def test_every_image_mode_becomes_the_rgb_a_viewer_shows(tmp_path):
    rgb = lambda path: np.asarray(loader.open_image(str(path)))  # noqa: E731
    grey16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")  # a 16-bit PNG (Pillow opens it as I;16 or I)
    assert rgb(tmp_path / "grey16.png")[0, :, 0].tolist() == [0, 128, 255]  # not clipped to white at 255
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I").save(tmp_path / "int32.tif")
    assert rgb(tmp_path / "int32.tif")[0, :, 1].tolist() == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "float.tif")
    assert rgb(tmp_path / "float.tif")[0, :, 2].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), "F").save(tmp_path / "float255.tif")
    assert rgb(tmp_path / "float255.tif")[0, :, 0].tolist() == [0, 100, 255]
    Image.new("1", (2, 1), 1).save(tmp_path / "bw.png")
    assert rgb(tmp_path / "bw.png").tolist() == [[[255, 255, 255]] * 2]
    Image.new("L", (1, 1), 77).save(tmp_path / "l.png")
    assert rgb(tmp_path / "l.png").tolist() == [[[77, 77, 77]]]
    pal = Image.new("P", (1, 1), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    assert rgb(tmp_path / "palette.png").tolist() == [[[200, 10, 20]]]
    Image.new("RGBA", (1, 1), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert rgb(tmp_path / "rgba.png").tolist() == [[[10, 20, 30]]]  # alpha dropped (as Dassl's read_image)
    Image.new("LA", (1, 1), (90, 5)).save(tmp_path / "la.png")
    assert rgb(tmp_path / "la.png").tolist() == [[[90, 90, 90]]]
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = rgb(tmp_path / "cmyk.jpg")[0, 0].tolist()
    assert r > 240 and g < 15 and b < 15  # pure red
    upright = np.zeros((4, 2, 3), dtype=np.uint8)
    upright[0, 0] = 255  # a white pixel at the top left of a 2 x 4 (w x h) image
    stored = Image.fromarray(upright).transpose(Image.ROTATE_90)  # stored sideways (4 x 2), EXIF says: rotate back
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer rotates 90 degrees clockwise
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    shown = rgb(tmp_path / "phone.png")
    assert shown.shape == (4, 2, 3) and shown[0, 0].tolist() == [255, 255, 255]


def test_check_counts_a_16_bit_image_as_read(tmp_path, capsys):
    d = make_folder_dataset(tmp_path / "d", per_class=3, masks=False)
    path = os.path.join(d, "red_circle", "img_000.png")
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(path)
    assert datatools.check("folder", d) == 0
    assert " fine, 0 unreadable" in capsys.readouterr().out
    assert np.asarray(loader.open_image(path))[0, 0].tolist() == [117, 117, 117]  # 30000 / 257, rounded


# ---- split files are checked on read


def test_few_shot_files_are_checked_against_their_name_and_the_dataset(random_toy, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(random_toy[0], root)
    b = data.load_benchmark("toy", root, shots=1, seed=1)
    cache = b.meta["fewshot_cache"]
    good = json.load(open(cache))

    def broken(edit, match):
        d = json.loads(json.dumps(good))
        edit(d)
        json.dump(d, open(cache, "w"))
        with pytest.raises(data.SplitFileError, match=match):
            data.load_benchmark("toy", root, shots=1, seed=1)
    full = json.load(open(os.path.join(root, "toy", "split_toy.json")))["train"]
    more = [x for x in full if x[1] == 0 and x not in good["train"]][:2]
    broken(lambda d: d["train"].extend(more), r"class 0 'red circle' has 3 item\(s\), but a 1-shot list holds")
    broken(lambda d: d["train"].append(d["train"][0]), "listed twice")
    broken(lambda d: d["train"].__setitem__(0, ["../../x.png", 0, "red circle"]), "not inside the dataset")
    broken(lambda d: d["train"].__setitem__(0, [d["train"][0][0], 1, "red circle"]), "not images of the dataset")
    json.dump(good, open(cache, "w"))
    assert data.load_benchmark("toy", root, shots=1, seed=1).meta["cache_hit"]


def test_split_files_refuse_paths_outside_and_leaks(tmp_path):
    path = tmp_path / "split.json"
    json.dump({"train": [["a.png", 0, "a"]], "val": [], "test": [["a.png", 0, "a"]]}, open(path, "w"))
    with pytest.raises(data.SplitFileError, match="a.png is in both 'train' and 'test'"):
        data.read_split_json(str(path))
    json.dump({"train": [["/etc/passwd", 0, "a"]], "val": [], "test": []}, open(path, "w"))
    with pytest.raises(data.SplitFileError, match="not inside the dataset"):
        data.read_split_json(str(path))


def test_import_refuses_a_split_with_more_shots_than_its_name(random_toy, tmp_path, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(random_toy[0], root)
    export = datatools.export_splits("toy", root, str(tmp_path / "splits"), shots=(1,), seeds=(1,))
    f = os.path.join(export, "shot_1-seed_1.json")
    d = json.load(open(f))
    full = json.load(open(os.path.join(root, "toy", "split_toy.json")))["train"]
    d["train"] += [x for x in full if x not in d["train"]][:2]
    json.dump(d, open(f, "w"))
    sums = os.path.join(export, "SHA256SUMS")
    open(sums, "w").write(f"{datatools.sha256_file(f)}  shot_1-seed_1.json\n")
    assert datatools.main(["import-splits", export, "--root", root]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "shot_1-seed_1.json (train): class" in err and "1-shot list" in err
    open(f, "w").write("{not json")
    open(sums, "w").write(f"{datatools.sha256_file(f)}  shot_1-seed_1.json\n")
    assert datatools.main(["import-splits", export, "--root", root]) == 1
    assert "shot_1-seed_1.json: not valid JSON" in capsys.readouterr().err


# ---- results: the chance flag, unreadable results, unfinished runs


@pytest.mark.parametrize("images,classes", [(6, 2), (2400, 24)])
def test_chance_flag_never_fires_above_chance(images, classes):
    chance = 100 / classes
    assert train.at_chance(0.0, images, classes) and train.at_chance(chance, images, classes)
    assert not train.at_chance(100.0, images, classes)
    assert not train.at_chance(chance + train.CHANCE_MARGIN + 0.01, images, classes)


def test_an_unreadable_result_is_left_out_and_not_done(random_toy, tmp_path, capsys):
    out = tmp_path / "runs"
    train_random_toy(random_toy, out, "coop", epochs=1)
    train_random_toy(random_toy, out, "coop", "--seed", "2", epochs=1)
    broken = run_folder(out, "coop", "--seed", "2", epochs=1)
    open(os.path.join(broken, "result.json"), "w").close()
    b2n, _ = tables.table(str(out))
    captured = capsys.readouterr()
    assert "result.json is not a readable result" in captured.err and broken in captured.err
    assert b2n["coop"]["rows"]["toy"]["seeds"] == [1]
    assert "Unreadable result.json files (left out of the tables): 1" in open(out / "table.md").read()
    assert sweep.run_status(broken) == "unfinished"
    result = train_random_toy(random_toy, out, "coop", "--seed", "2", "--resume", epochs=1)  # evaluated again
    assert runs.read_result(broken)["accuracy"] == result["accuracy"]


def test_predict_and_attention_refuse_an_unfinished_run(random_toy, tmp_path, capsys):
    out = tmp_path / "runs"
    train_random_toy(random_toy, out, "coop", epochs=2)
    d = run_folder(out, "coop", epochs=2)
    os.remove(os.path.join(d, "result.json"))
    image = os.path.join(random_toy[0], "toy", "images", "red_circle", "test_000.png")
    code, err = cli_error(capsys, evaluation.main, ["predict", d, image])
    assert code == 1 and "is an unfinished run" in err and "--allow-unfinished" in err
    code, err = cli_error(capsys, evaluation.main, ["attention", d, image, "--out", str(tmp_path / "pics")])
    assert code == 1 and "is an unfinished run" in err
    rows = evaluation.main(["predict", d, image, "--allow-unfinished", "--topk", "2"])
    assert len(rows) == 1 and len(rows[0][1]) == 2 and "epoch 2 of 2" in capsys.readouterr().out
    for k in ("0", "-1"):
        code, err = cli_error(capsys, evaluation.main, ["predict", d, image, "--allow-unfinished", "--topk", k])
        assert code == 1 and err.strip() == f"error: --topk {k}: expected a number of classes >= 1"


# ---- interrupted, failed and concurrent commands


def test_a_failing_command_leaves_no_folder(random_toy, tmp_path, capsys):
    out = tmp_path / "runs"
    for bad, message in ((["--shots", "-3"], "--shots -3"), (["--attn", "flash"], "--attn 'flash': expected one of"),
                         (["--precision", "fp8"], "--precision 'fp8'")):
        code, err = fails(capsys, (random_toy, out, "coop", *bad))
        assert code == 1 and message in err
    code, err = fails(capsys, (random_toy, out, "fvgpt", "--host-run", "nowhere"))
    assert code == 1 and "fvgpt needs --host-run" in err
    assert not os.path.exists(out)  # nothing was made: no folder holding only a log and a lock


def test_interrupt_during_the_final_evaluation_says_so_and_resume_finishes(random_toy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    real = train.evaluate_settings
    monkeypatch.setattr(train, "evaluate_settings", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        train_random_toy(random_toy, out, "coop", epochs=1)
    assert e.value.code == 130
    d = run_folder(out, "coop", epochs=1)
    assert "interrupted during the final evaluation" in open(os.path.join(d, "log.txt")).read()
    open(os.path.join(d, "resume.pt.tmp999"), "w").close()  # what a kill during a write leaves
    monkeypatch.setattr(train, "evaluate_settings", real)
    result = train_random_toy(random_toy, out, "coop", "--resume", epochs=1)
    assert result["accuracy"] and not os.path.exists(os.path.join(d, "resume.pt.tmp999"))
    assert json.load(open(os.path.join(d, "config.json")))["world_size"] == 1


def test_sigterm_stops_a_run_with_a_message_and_it_resumes(random_toy, tmp_path):
    root, clip_path = random_toy
    out = tmp_path / "runs"
    argv = [sys.executable, os.path.join(REPO, "train.py"), "--method", "coop", "--dataset", "toy", "--root", root,
            "--out", str(out), "--clip", clip_path, "--subsample", "base", "--shots", "4", "--epochs", "200",
            "--warmup-epochs", "0", "--log-every", "1000", "--threads", "1"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=REPO)
    d = run_folder(out, "coop", epochs=200)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(d, "resume.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "continue with --resume" in err
    assert not os.path.exists(os.path.join(d, "result.json"))


def test_a_second_command_is_told_about_the_lock_not_to_resume(random_toy, tmp_path):
    out = tmp_path / "runs"
    train_random_toy(random_toy, out, "coop", epochs=2)
    d = run_folder(out, "coop", epochs=2)
    os.remove(os.path.join(d, "result.json"))  # unfinished, and another process holds the lock (evaluating)
    with open(os.path.join(d, "train.lock"), "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        child = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *run_args(random_toy, out)],
                               capture_output=True, text=True, cwd=REPO)
    assert child.returncode == 1 and "another process (pid 4242) is training or evaluating" in child.stderr
    assert "--resume" not in child.stderr.split("wait for it")[0]


def run_args(random_toy, out):
    root, clip_path = random_toy
    return ["--method", "coop", "--dataset", "toy", "--root", root, "--out", str(out), "--clip", clip_path,
            "--subsample", "base", "--shots", "4", "--epochs", "2", "--warmup-epochs", "0", "--log-every", "1000"]


def test_seconds_leave_out_set_up_and_every_warning_reaches_the_result(random_toy, tmp_path, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(random_toy[0], root)
    d = os.path.join(root, "toy")
    b = data.load_benchmark("toy", root, shots=4, subsample="base")
    for p, _, _ in b.train[:2]:  # masks whose size differs from their image: a warning
        m = loader.mask_path(d, p)
        Image.open(m).resize((16, 16)).save(m)
    out = tmp_path / "runs"
    result = train_random_toy((root, random_toy[1]), out, "dapt", epochs=1)
    assert any("masks differ in size from their image" in w for w in result["warnings"])
    assert "WARNING: 2 of" in capsys.readouterr().out  # the end summary lists it
    assert result["setup_seconds"] >= 0 and result["seconds"] > 0
    log = open(os.path.join(result["run_dir"], "log.txt")).read()
    assert '"transform_train"' in log  # the whole config is in log.txt ...
    assert '"transform_train"' not in capsys.readouterr().err  # ... not on the terminal


# ---- one error line where a traceback was


def test_a_corrupt_image_read_by_a_worker_process_is_one_line(random_toy, tmp_path, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(random_toy[0], root)
    b = data.load_benchmark("toy", root, shots=4, subsample="base")
    open(b.train[0][0], "wb").close()  # a 0-byte image
    data_args = ["--workers", "1"]
    code, err = fails(capsys, ((root, random_toy[1]), tmp_path / "runs", "coop", *data_args))
    assert code == 1 and err.startswith(f"error: cannot read image {b.train[0][0]}")


def test_cuda_without_cuda_and_unusual_roots_are_one_line(random_toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = fails(capsys, (random_toy, tmp_path / "runs", "coop", "--device", "cuda"))
    assert code == 1 and "--device cuda: this torch" in err and "sees no CUDA device" in err
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    code, err = cli_error(capsys, train.main, ["--method", "coop", "--dataset", "folder", "--root", str(a_file)])
    assert code == 1 and "is a file, not a folder" in err


def test_an_unwritable_cache_names_dapt_cache(random_toy, tmp_path, monkeypatch):
    d = make_folder_dataset(tmp_path / "shared", per_class=4, masks=False)
    monkeypatch.setenv("DAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "can_write", lambda folder: False)  # neither the dataset nor the user cache
    with pytest.raises(data.DataValueError, match=r"set \$DAPT_CACHE to a writable folder"):
        data.load_benchmark("folder", d, shots=0)


def test_a_sweep_failure_quotes_the_error_line(random_toy, tmp_path):
    root, clip_path = random_toy
    plan = tmp_path / "plan.txt"
    plan.write_text(f"--method coop --dataset toy --subsample base --shots 4 --epochs 1 --clip {clip_path}\n"
                    f"--method fvgpt --dataset toy --subsample base --shots 4 --epochs 1 --clip {clip_path} "
                    "--host-run missing\n")
    lines = []
    stats = sweep.sweep(str(plan), out=str(tmp_path / "runs"), root=root, jobs=2, gpus=[], echo=lines.append)
    (failed_dir, error), = stats["failed"]
    assert "error: fvgpt needs --host-run" in error and "exit code 1" in error


def test_table_says_1_shot_and_flags_keys_may_use_equals(random_toy, tmp_path):
    out = tmp_path / "runs"
    train_random_toy(random_toy, out, "coop", "--lr=0.01", subsample="all", shots=1, epochs=1)
    tables.table(str(out))
    assert "| 1 shot |" in open(out / "table.md").read()
