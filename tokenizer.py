"""OpenAI CLIP's byte-level BPE tokenizer, written again from its specification (protocol.md section 10).

The ids are exactly those of OpenAI's `clip.simple_tokenizer.SimpleTokenizer` + `clip.tokenize`, checked
against goldens made with the reference code (tests/golden/). Pipeline for one text:
  clean:        ftfy.fix_text (when ftfy is importable) -> html.unescape twice -> strip -> whitespace runs
                to one space -> strip -> lower-case
  pre-tokenise: special tokens, the contractions 's 't 're 've 'm 'll 'd, letter runs, single number
                characters, runs of anything else; whitespace separates and is never a token
  BPE:          each pre-token's UTF-8 bytes as printable symbols, `</w>` on the last one, then merge the
                adjacent pair of lowest rank until no pair is in the merge table
  ids:          [SOT] + ids + [EOT], zero-padded to the context length

What is deliberately left out: the third-party `regex` module (the pre-tokeniser is a hand-written scanner
over `unicodedata` categories; characters assigned after the Python build's Unicode version may be
classified differently than by a newer `regex`), ftfy as a hard dependency (without it, text that ftfy
would repair - mojibake, curly quotes, control and other odd characters - tokenises differently; a warning
is logged once), training a vocabulary, and every vocabulary other than OpenAI's.
"""
import gzip
import hashlib
import html
import logging
import os
import re
import unicodedata

import torch

log = logging.getLogger("dapt")

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the file; the rest is never used
SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|>; EOT is the largest id (text pooling = argmax)
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, tried in this order

# The reference matches `\s` of the `regex` module: Unicode White_Space. Python's str.isspace() also
# accepts U+001C..U+001F, which the reference keeps as punctuation (its str.strip() still removes them).
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")
_WHITESPACE_RUN = re.compile("[" + re.escape(WHITESPACE) + "]+")
# The reference pattern is case-insensitive. After lower-casing this matters for two characters only:
# U+0345 case-folds to a letter, so neither the letter class nor the "other" class accepts it and it is
# dropped like whitespace; long s (U+017F) case-folds to "s", so it completes 's and <|startoftext|>.
_SKIP = frozenset(WHITESPACE + "\u0345")
_FOLD = str.maketrans({"\u017f": "s"})


def bytes_to_unicode():
    """GPT-2's byte -> character table, in vocabulary order: the 188 printable bytes map to themselves
    (in byte order), then the other 68 bytes map to U+0100, U+0101, ... (in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _kind(ch):
    """'L' letter, 'N' number, ' ' skipped (whitespace), 'P' anything else."""
    if ch in _SKIP:
        return " "
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "P"


def pretokenize(text):
    """Split cleaned (lower-cased) text the way OpenAI's regex does: at each position the first
    alternative that matches wins (special token, contraction, letter run, one number, other run)."""
    folded, out, i, n = text.translate(_FOLD), [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        match = next((s for s in SPECIALS if folded.startswith(s, i)), None)
        if match is None and text[i] == "'":
            match = next(("'" + c for c in CONTRACTIONS if folded.startswith(c, i + 1)), None)
        if match is not None:
            j = i + len(match)
        elif kind == "N":
            j = i + 1
        else:  # greedy run of one kind: a run of "other" characters swallows apostrophes and '<|' alike
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        out.append(text[i:j])
        i = j
    return out


_fix_text = None  # ftfy.fix_text, or the identity after one warning


def _ftfy_fix_text(text):
    global _fix_text
    if _fix_text is None:
        try:
            import ftfy

            _fix_text = ftfy.fix_text
        except ImportError:
            log.warning("ftfy is not installed: the tokenizer skips ftfy.fix_text. Ids are unchanged for plain "
                        "text; text with mojibake, curly quotes or control characters tokenises differently "
                        "from OpenAI's (pip install ftfy to match it exactly)")
            _fix_text = lambda t: t  # noqa: E731
    return _fix_text(text)


def clean(text, use_ftfy=None):
    """OpenAI's basic_clean + whitespace_clean + lower(). use_ftfy: None = when importable, False = never."""
    if use_ftfy is None:
        text = _ftfy_fix_text(text)
    elif use_ftfy:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def load_merges(path=VOCAB_PATH):
    """The 48894 merge pairs, rank = position. The shipped file is checked against its sha256."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}. It ships with the project as "
                                f"assets/bpe_simple_vocab_16e6.txt.gz; restore it from the repository.")
    with open(path, "rb") as f:
        raw = f.read()
    if os.path.abspath(path) == VOCAB_PATH and hashlib.sha256(raw).hexdigest() != VOCAB_SHA256:
        raise ValueError(f"{path} is corrupt: sha256 {hashlib.sha256(raw).hexdigest()}, expected {VOCAB_SHA256} "
                         f"(OpenAI's bpe_simple_vocab_16e6.txt.gz, 1,356,917 bytes); restore it from the repository.")
    try:
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a gzip-compressed UTF-8 BPE vocabulary ({e}).") from e
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected a header line then {NUM_MERGES} lines 'left right' (one merge each).")
    return merges


class SimpleTokenizer:
    """encode(text) -> BPE ids (no SOT/EOT), decode(ids) -> text with a space after every word."""

    def __init__(self, path=VOCAB_PATH, use_ftfy=None):
        self.use_ftfy = use_ftfy
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        merges = load_merges(path)
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + list(SPECIALS)
        self.encoder = {s: i for i, s in enumerate(vocab)}
        if len(self.encoder) != len(vocab) or self.encoder[SPECIALS[1]] != EOT:
            raise ValueError(f"{path}: the merges do not give {EOT + 1} distinct vocabulary entries.")
        self.decoder = vocab
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.cache = {s: (s,) for s in SPECIALS}  # special tokens are never split

    def bpe(self, token):
        """token: byte symbols of one pre-token -> tuple of vocabulary symbols."""
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, NUM_MERGES))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the pair, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = tuple(word)
        return self.cache[token]

    def encode(self, text):
        ids = []
        for piece in pretokenize(clean(text, self.use_ftfy)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length=77, truncate=False):
        """LongTensor [N, context_length]: SOT, ids, EOT, zeros. Too long: ValueError, or with truncate
        the first context_length ids with the last one set to EOT."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT] + self.encode(text) + [EOT]
            if len(ids) > context_length:
                if not truncate:
                    short = text if len(text) <= 60 else text[:57] + "..."
                    raise ValueError(f"text {short!r} is {len(ids)} tokens long with start and end tokens, more "
                                     f"than context length {context_length}; shorten it or pass truncate=True")
                ids = ids[:context_length]
                ids[-1] = EOT
            out[row, :len(ids)] = torch.tensor(ids)
        return out


_default = None


def get_tokenizer():
    """The shared tokenizer over the shipped vocabulary (loaded on first use, about 0.1 s)."""
    global _default
    if _default is None:
        _default = SimpleTokenizer()
    return _default


def tokenize(texts, context_length=77, truncate=False):
    """str or list of str -> LongTensor [N, context_length] (OpenAI's clip.tokenize, ids as int64)."""
    return get_tokenizer()(texts, context_length, truncate)


def encode(text):
    return get_tokenizer().encode(text)


def decode(ids):
    return get_tokenizer().decode(ids)
