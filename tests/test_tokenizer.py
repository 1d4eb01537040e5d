"""tokenizer.py against OpenAI's reference ids (tests/golden/tokenizer_ids.json, made by
tests/golden/make_reference_goldens.py with OpenAI's SimpleTokenizer, with and without ftfy).

Strings of the goldens whose ids change without ftfy (meta.differ_without_ftfy, 18 of 779): control and
format characters (a\\ufeffb, a\\x1cb, a\\x1fb, a\\x85b, a\\x00b, a\\x07b: ftfy deletes or replaces them),
Unicode normalisation (e + U+0301 -> é, U+01C5 DŽ-ligature titlecase, the ﬁ ligature, full-width ＡＢＣ１２３),
curly quotes (“quoted”, don’t, ‘single’), mojibake (cafÃ©, â€œmojibakeâ€, Ã©tÃ©, lâ€™hÃ´tel) and a
triple-escaped entity (&amp;amp;amp;: ftfy unescapes once more). Every class name is unchanged.
"""
import gzip
import json
import logging
import os
import sys

import pytest
import torch

import tokenizer as T

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "tokenizer_ids.json"), encoding="ascii"))
CASES = GOLDEN["cases"]


def _has_ftfy():
    try:
        import ftfy  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def no_ftfy():
    return T.SimpleTokenizer(use_ftfy=False)


def _mismatches(encode, key):
    return [(c["text"], c[key], encode(c["text"])) for c in CASES if encode(c["text"]) != c[key]]


def test_goldens_cover_what_the_spec_asks():
    texts = [c["text"] for c in CASES]
    assert len(texts) >= 250 and "" in texts and "<|endoftext|>" in texts and "&amp;amp;" in texts
    assert any(len(c["noftfy"]) > 75 for c in CASES)  # a text too long for the default context


def test_ids_match_reference_without_ftfy(no_ftfy):
    bad = _mismatches(no_ftfy.encode, "noftfy")
    assert not bad, f"{len(bad)} strings differ from OpenAI's ids (ftfy off), first: {bad[:3]}"


def test_ids_match_reference_with_ftfy():
    if not _has_ftfy():
        pytest.skip("ftfy is optional and not installed here; the ftfy-off ids are checked above")
    bad = _mismatches(T.SimpleTokenizer(use_ftfy=True).encode, "ftfy")
    assert not bad, f"{len(bad)} strings differ from OpenAI's ids (with ftfy), first: {bad[:3]}"


def test_without_ftfy_plain_ascii_is_unchanged():
    differ = [c["text"] for c in CASES if c["ftfy"] != c["noftfy"]]
    assert differ == GOLDEN["meta"]["differ_without_ftfy"]
    plain = [t for t in differ if all(" " <= ch <= "~" for ch in t) and "&amp;amp;amp;" not in t]
    assert not plain, f"printable ASCII text changes without ftfy: {plain}; all that differ: {differ}"


def test_default_warns_once_without_ftfy(monkeypatch, caplog, no_ftfy):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError, even where it is installed
    monkeypatch.setattr(T, "_fix_text", None)
    tok = T.SimpleTokenizer()
    with caplog.at_level(logging.WARNING, logger="dapt"):
        ids = [tok.encode(c["text"]) for c in CASES[-40:]]
    assert ids == [c["noftfy"] for c in CASES[-40:]]
    warnings = [r for r in caplog.records if "ftfy" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_decode_matches_reference_and_round_trips(no_ftfy):
    bad = [c["text"] for c in CASES if no_ftfy.decode(c["ftfy"]) != c["decoded"]]
    assert not bad, f"decode differs from OpenAI's for {bad[:5]}"
    text = "a photo of a hard to see golden retriever on the beach"
    assert T.decode(T.encode(text)) == text + " "  # every word ends with </w>, decoded as a space
    assert T.decode(T.encode("Hello, World!")) == "hello , world ! "
    assert T.decode(T.tokenize("a dog")[0, :4]) == "<|startoftext|>a dog <|endoftext|>"


def test_vocabulary_layout():
    tok = T.get_tokenizer()
    assert len(tok.decoder) == 49408 and T.SOT == tok.encoder["<|startoftext|>"] == 49406
    assert T.EOT == tok.encoder["<|endoftext|>"] == 49407
    assert tok.encoder["!"] == 0 and tok.encoder["~"] == 93 and tok.encoder["\u0100"] == 188  # byte 0
    assert tok.encoder["!</w>"] == 256 and tok.decoder[512] == "in"  # first merge, line 1 of the file: "i n"
    assert T.encode("<|endoftext|>") == [T.EOT] and T.encode("<|startoftext|>") == [T.SOT]


def test_tokenize_shape_padding_and_specials():
    out = T.tokenize(["", "a photo of a beagle.", "<|endoftext|>"])
    assert out.dtype == torch.long and out.shape == (3, 77)
    assert out[0, :2].tolist() == [T.SOT, T.EOT] and not out[0, 2:].any()
    ids = [c for c in CASES if c["text"] == "a photo of a beagle."][0]["noftfy"]
    assert out[1, : len(ids) + 2].tolist() == [T.SOT] + ids + [T.EOT] and not out[1, len(ids) + 2:].any()
    assert out[2, :3].tolist() == [T.SOT, T.EOT, T.EOT]
    assert (out.argmax(dim=-1) == torch.tensor([1, len(ids) + 1, 1])).all()  # argmax = first EOT position
    single = T.tokenize("a photo of a beagle.", context_length=16)
    assert single.shape == (1, 16) and single[0].tolist() == out[1, :16].tolist()


def test_truncate_matches_reference():
    for case in GOLDEN["truncation"]:
        ours = T.tokenize(case["text"], case["context_length"], truncate=True)[0].tolist()
        assert ours == case["open_clip"], case["text"]
        n = len(T.encode(case["text"])) + 2
        if n > case["context_length"]:
            assert ours[-1] == T.EOT and len(ours) == case["context_length"]
            with pytest.raises(ValueError, match=f"context length {case['context_length']}") as err:
                T.tokenize(["ok", case["text"]], case["context_length"])
            assert repr(case["text"][:20])[:-1] in str(err.value) and "truncate=True" in str(err.value)
        else:
            assert torch.equal(T.tokenize(case["text"], case["context_length"]), torch.tensor([ours]))
    exact = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert T.tokenize(exact, 16)[0, -1].item() == T.EOT  # 14 words + 2 specials fit exactly
    with pytest.raises(ValueError):
        T.tokenize(exact, 15)


def test_shipped_vocabulary_file():
    assert os.path.getsize(T.VOCAB_PATH) == 1_356_917
    assert os.path.isfile(os.path.join(os.path.dirname(T.VOCAB_PATH), "LICENSE-openai-clip.txt"))


def test_missing_or_corrupt_vocabulary(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        T.SimpleTokenizer(str(tmp_path / "nope.txt.gz"))
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="gzip"):
        T.SimpleTokenizer(str(bad))
    bad.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="48894"):
        T.SimpleTokenizer(str(bad))
    monkeypatch.setattr(T, "VOCAB_PATH", str(bad))  # the shipped path is also checked against its sha256
    with pytest.raises(ValueError, match="sha256"):
        T.load_merges(str(bad))
