"""recipes.py: one precedence, stated once (COMMON < class defaults < recipe row < dataset row < command line <
switches), derived keys resolved in one place, every key a typed --flag that --help lists."""
import pytest

import classic
import dapt
import recipes
import train


def test_precedence_each_level_beats_the_one_before(monkeypatch):
    """A probe key set at every level: removing the top one reveals the next, in the documented order."""
    monkeypatch.setitem(recipes.COMMON, "probe", 1)
    monkeypatch.setattr(classic.CoOp, "defaults", dict(classic.CoOp.defaults, probe=2))
    monkeypatch.setitem(recipes.RECIPES, "coop", {"fewshot": dict(recipes.RECIPES["coop"]["fewshot"], probe=3)})
    monkeypatch.setitem(recipes.DATASET_OVERRIDES, ("coop", "caltech101"), dict(probe=4))
    monkeypatch.setitem(recipes.SWITCHES, "official_optim", dict(probe=6))  # a switch (not a CoOp key: a probe)
    resolve = lambda **over: recipes.resolve_config("coop", "caltech101", over)["probe"]  # noqa: E731
    assert resolve(probe=5) == 5  # the command line beats every table
    assert resolve() == 4
    del recipes.DATASET_OVERRIDES[("coop", "caltech101")]
    assert resolve() == 3
    recipes.RECIPES["coop"]["fewshot"].pop("probe")
    assert resolve() == 2  # the class default beats COMMON
    monkeypatch.setattr(classic.CoOp, "defaults", {k: v for k, v in classic.CoOp.defaults.items() if k != "probe"})
    assert resolve() == 1


def test_a_switch_beats_the_tables_but_not_the_command_line():
    on = recipes.resolve_config("davpt", "caltech101", {"official_optim": True})
    assert on["lr"] == 5e-4 and on["optimizer"] == "adamw"  # the recipe row says 0.0025, sgd
    given = recipes.resolve_config("davpt", "caltech101", {"official_optim": True, "lr": 0.1})
    assert given["lr"] == 0.1 and given["optimizer"] == "adamw"


def test_no_class_default_is_silently_overridden_by_common():
    """Every key a model class defines resolves to the class's value unless a recipe or dataset row sets it
    (PromptSRC's epochs = 20 once lost to COMMON's 10)."""
    for method, cls in dapt.METHODS.items():
        rows = [row for row in recipes.RECIPES[method].values()]
        for key, value in cls.defaults.items():
            if key in recipes.COMMON and not any(key in row for row in rows):
                assert recipes.resolve_config(method, None, {})[key] == value, (method, key)
    recipes_without_epochs = {"b2n": {k: v for k, v in recipes.RECIPES["promptsrc"]["b2n"].items() if k != "epochs"}}
    try:
        saved, recipes.RECIPES["promptsrc"] = recipes.RECIPES["promptsrc"], recipes_without_epochs
        assert recipes.resolve_config("promptsrc", None, {"subsample": "base"})["epochs"] == 20
    finally:
        recipes.RECIPES["promptsrc"] = saved


def test_derived_keys_are_resolved_here(tmp_path):
    assert recipes.resolve_config("zsclip", "dtd", {})["template"] == "{} texture."
    assert recipes.resolve_config("zsclip", None, {})["template"] == ""  # no dataset: still "the dataset's"
    (tmp_path / "template.txt").write_text("a photo of a {}, a bird.\n")
    assert recipes.resolve_config("zsclip", "folder", {}, str(tmp_path))["template"] == "a photo of a {}, a bird."
    assert recipes.resolve_config("coop", "toy", {"shots": 4})["epochs"] == 100  # CoOp's epochs per shot count
    assert recipes.resolve_config("coop", "toy", {"shots": 4, "epochs": 7})["epochs"] == 7
    assert recipes.resolve_config("coop", "toy", {"data_fraction": 0.5})["shots"] == 0
    assert recipes.resolve_config("coop", "toy", {"subsample": "base"})["setting"] == "b2n"


def test_help_lists_every_key_of_the_method_with_its_default_and_type(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "dapt", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key, value in recipes.resolve_config("dapt", None, {}).items():
        if key not in recipes.FIXED:
            assert f"--{key.replace('_', '-')}" in out, key
    assert "--prompt-depth INT" in out and "default 9" in out  # MaPLe's key (DAPT's host) with its type and default
    assert "--dapt-w-v FLOAT" in out and "--cue STR" in out and "--bias-tuning" not in out  # DA-VPT's: not DAPT's


def test_flags_are_typed_and_accept_both_spellings():
    args = train.parse_args(["--method", "coop", "--dataset", "toy", "--lr=0.5", "--csc", "true", "--tag", "-x",
                             "--rrc-scale", "0.5,1"])
    assert args.cfg["lr"] == 0.5 and args.cfg["csc"] is True and args.cfg["tag"] == "-x"
    assert args.cfg["rrc_scale"] == (0.5, 1.0)
    with pytest.raises(dapt.ConfigError, match="--lr: cannot read 'fast' as float"):
        train.parse_args(["--method", "coop", "--dataset", "toy", "--lr", "fast"])
    with pytest.raises(dapt.ConfigError, match="unknown config key.*--n-cxt.*Valid keys: .*n_ctx"):
        train.parse_args(["--method", "coop", "--dataset", "toy", "--n-cxt", "4"])
