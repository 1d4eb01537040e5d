"""clip.py against open_clip's CLIP: same weights (random_clip(SMALL_CONFIG, seed=0)), same inputs, same features.

The goldens (tests/golden/clip_features.json) were made by tests/golden/make_reference_goldens.py, which loads
our state dict strictly into open_clip 3.3.0's CLIP (QuickGELU) and stores its encode_image / encode_text
outputs and open_clip's token ids. open_clip is never a dependency of this project.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import tokenizer
from conftest import SMALL_CONFIG, random_clip

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "clip_features.json"), encoding="ascii"))


@pytest.fixture(scope="module")
def model():
    m = random_clip(SMALL_CONFIG, seed=0)
    changed = [k for k, (s, s2) in GOLDEN["state_fingerprint"].items()
               if k not in m.state_dict() or not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) for a, b in
                                                     zip((s, s2), _fingerprint(m.state_dict()[k])))]
    assert not changed and len(m.state_dict()) == len(GOLDEN["state_fingerprint"]), (
        f"random_clip(SMALL_CONFIG, seed=0) no longer gives the weights the goldens were made with "
        f"(keys {changed[:5]}); "
        "if its initialisation changed on purpose, rerun tests/golden/make_reference_goldens.py")
    return m.float()


def _fingerprint(t):
    return t.double().sum().item(), t.double().square().sum().item()


def test_config_matches_golden():
    assert GOLDEN["config"] == SMALL_CONFIG


def test_tokenizer_matches_open_clip_on_feature_texts():
    assert tokenizer.tokenize(GOLDEN["texts"]).tolist() == GOLDEN["tokens"]


def test_image_features_match_open_clip(model):
    images = torch.from_numpy(np.random.RandomState(0).standard_normal([4, 3, 32, 32]).astype(np.float32))
    with torch.no_grad():
        got = model.encode_image(images)
    torch.testing.assert_close(got, torch.tensor(GOLDEN["image_features"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cut", [True, False])
def test_text_features_match_open_clip(model, cut):
    with torch.no_grad():
        got = model.encode_text(torch.tensor(GOLDEN["tokens"]), cut=cut)
    torch.testing.assert_close(got, torch.tensor(GOLDEN["text_features"]), rtol=1e-5, atol=1e-5)
