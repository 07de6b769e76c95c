"""A real CLIP BPE tokenizer for the tiny model's caption vocabulary.

We learn byte-pair merges over the caption words ourselves (classic BPE: repeatedly merge the most
frequent adjacent pair) until every word is one token, write CLIP's vocab.json / merges.txt, and
load them with `transformers.CLIPTokenizer`. The result tokenizes exactly like any CLIP tokenizer
(lower-casing, word splitting, end-of-word suffix `</w>`), so the SDXL pipeline's prompt encoding
runs unchanged.

`CLIPTokenizer.from_pretrained` on a missing or empty folder can quietly return a tokenizer with
only special tokens, mapping every word to one id: the model would then ignore its prompt.
`verify_tokenizer` is the guard against that, and `load_tokenizer` always calls it.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from transformers import CLIPTokenizer

from .shapes import VOCABULARY, caption, all_combos

EOW = "</w>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# A distinct unknown token (original CLIP reuses EOS): an unknown word is then visible as such.
UNK = "<|unknown|>"
MODEL_MAX_LENGTH = 16


def learn_bpe(words: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(symbols, merges): base symbols and the ordered merges that make every word one token."""
    segs = {w: tuple(w[:-1]) + (w[-1] + EOW,) for w in sorted(set(words))}
    base = [c for c in string.ascii_lowercase] + [c + EOW for c in string.ascii_lowercase]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs.values()):
        pairs: Counter = Counter()
        for s in segs.values():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        # Ties are broken by the pair itself so the merges never depend on dict or hash order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new[w] = tuple(out)
        segs = new
    return base, merges


def vocab_and_merges(words: Sequence[str] = VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    for w in words:
        if not w or any(c not in string.ascii_lowercase for c in w):
            raise ValueError(f"vocabulary words must be lower-case ASCII letters: {w!r}")
    base, merges = learn_bpe(words)
    tokens = list(base)
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    # Special tokens last, EOS highest: CLIP's legacy pooling takes the argmax id as the EOS position.
    tokens += [UNK, BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | os.PathLike, words: Sequence[str] = VOCABULARY) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH, words: Sequence[str] = VOCABULARY,
                    longest_caption: str | None = None) -> CLIPTokenizer:
    """A verified CLIPTokenizer for the caption vocabulary, built from files we write (another model's
    vocabulary: pass its words and its longest caption)."""
    with tempfile.TemporaryDirectory(prefix="mixprec_tok_") as tmp:
        write_tokenizer_files(tmp, words)
        tok = CLIPTokenizer.from_pretrained(
            tmp, local_files_only=True,
            unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=EOS,
            model_max_length=model_max_length,
        )
    verify_tokenizer(tok, words, longest_caption)
    return tok


def _longest_tiny_caption() -> str:
    return max((caption(*c) for c in all_combos()), key=len)


def verify_tokenizer(tok, words: Sequence[str] = VOCABULARY, longest_caption: str | None = None) -> None:
    """Raise if the tokenizer does not really tokenize the caption vocabulary.

    Every word must be a single known, non-unknown token, distinct words distinct ids, and a
    caption must decode back to itself and fit in model_max_length with BOS and EOS.
    """
    problems = []
    ids = {}
    for w in words:
        enc = tok(w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or enc[0] == tok.unk_token_id:
            problems.append(f"{w!r} -> {enc}")
        else:
            ids[w] = enc[0]
    if len(set(ids.values())) != len(ids):
        problems.append(f"distinct words share ids: {ids}")
    longest = longest_caption or _longest_tiny_caption()
    enc = tok(longest)["input_ids"]
    if tok.unk_token_id in enc:
        problems.append(f"unknown token in {longest!r}: {enc}")
    if len(enc) > tok.model_max_length:
        problems.append(f"{longest!r} needs {len(enc)} tokens > model_max_length {tok.model_max_length}")
    if tok.decode(enc, skip_special_tokens=True) != longest:
        problems.append(f"decode round trip failed: {tok.decode(enc, skip_special_tokens=True)!r}")
    if problems:
        raise ValueError(
            "tokenizer does not tokenize the model's caption vocabulary (an empty or wrong tokenizer folder "
            f"gives a tokenizer that ignores the prompt): vocab size {len(tok)}; " + "; ".join(problems)
        )


def load_tokenizer(folder: str | os.PathLike, words: Sequence[str] = VOCABULARY,
                   longest_caption: str | None = None) -> CLIPTokenizer:
    """CLIPTokenizer.from_pretrained(folder), refusing a missing folder or a useless tokenizer."""
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).exists() for f in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer files (vocab.json or tokenizer.json) in {folder}")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    verify_tokenizer(tok, words, longest_caption)
    return tok
