"""The mixed-precision path a CUDA run takes, executed on the CPU: bfloat16 weights under bfloat16 autocast, and
float16 under float16 autocast with a gradient scaler (torch.amp.GradScaler("cpu")), for every method on a tiny
toy benchmark: the loss stays finite, the trained tensors stay float32, the frozen CLIP keeps its dtype and its
values, and a checkpoint loads back into a float32 model whose predictions equal the run's (within bf16 / fp16
tolerance)."""
import os

import pytest
import torch

import dapt
import train
import runs
from conftest import metrics_of, train_random_toy

METHODS = [m for m in dapt.METHODS if m != "fvgpt"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def trained_run(random_toy, out, method, precision, seen, monkeypatch, *extra):
    """train.main for one epoch at `precision`; records, after the epoch, the dtypes of the frozen CLIP and of the
    trained tensors and whether the CLIP's values moved."""
    real = train.train_one_epoch

    def spy(cfg, model, opt, scaler, *args):
        before = {k: v.clone() for k, v in model.clip.state_dict().items()}
        stats = real(cfg, model, opt, scaler, *args)
        seen.update(clip={v.dtype for v in model.clip.state_dict().values()},
                    trained={p.dtype for p in model.parameters() if p.requires_grad},
                    frozen_moved=[k for k, v in model.clip.state_dict().items() if not torch.equal(v, before[k])],
                    scaler=scaler.is_enabled())
        return stats

    monkeypatch.setattr(train, "train_one_epoch", spy)
    return train_random_toy(random_toy, out, method, "--batch", "12", "--lr", "0.01", "--precision", precision, *extra,
                            shots=1, epochs=1)


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision_trains_and_loads_back_in_float32(random_toy, tmp_path, monkeypatch, method, precision):
    seen = {}
    result = trained_run(random_toy, tmp_path, method, precision, seen, monkeypatch)
    run_dir = result["run_dir"]
    if method != "zsclip":  # zero-shot CLIP does not train: the evaluation below runs at the precision
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics_of(run_dir))
        assert seen["clip"] == {DTYPES[precision]}, seen  # the frozen weights keep the run's dtype ...
        assert seen["frozen_moved"] == [], seen["frozen_moved"]  # ... and their values
        assert seen["trained"] == {torch.float32}  # float32 master prompts
        assert seen["scaler"] == (precision == "fp16")  # loss scaling for float16 only
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["params"].values() if v.is_floating_point())
    # the checkpoint in a float32 model predicts as the run's model at its precision
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f32 = runs.load_run(run_dir, dtype=torch.float32)
    low = runs.load_run(run_dir, dtype=DTYPES[precision])
    with torch.no_grad():
        ref = f32(images)
        with torch.autocast("cpu", dtype=DTYPES[precision]):
            got = low(images).float()
    tol = 0.05 * ref.abs().max() + 0.05
    assert (got - ref).abs().max() <= tol
    # a different top-1 only between near-tied classes (a random CLIP on noise images has many): the float32
    # logit of the low-precision choice is within the rounding tolerance of the float32 maximum
    picked = ref.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    assert (ref.max(-1).values - picked).max() <= 2 * tol


@pytest.mark.parametrize("precision", list(DTYPES))
def test_fvgpt_mixed_precision(random_toy, tmp_path, monkeypatch, precision):
    host = train_random_toy(random_toy, tmp_path, "coop", "--batch", "12", "--precision", precision, shots=1,
                            epochs=1)["run_dir"]
    seen = {}
    result = trained_run(random_toy, tmp_path, "fvgpt", precision, seen, monkeypatch, "--host-run", host)
    assert seen["trained"] == {torch.float32} and seen["frozen_moved"] == [] and seen["clip"] == {DTYPES[precision]}
    assert os.path.isfile(os.path.join(result["run_dir"], "result.json"))
