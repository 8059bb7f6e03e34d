"""Captions of toy faces from their exact factors, and the word-level vocabulary of the text toy.

A caption names a random subset of a face's factors in fixed phrases ("grey hair, glasses,
smiling, facing left"); the factors it does not name are whatever the world drew, so a caption
conditions the world's own distribution (the correlated pair stays: "grey hair" still comes with
glasses four times in five). A share of captions is empty, so the model also learns the
unconditional distribution that classifier-free guidance needs.

Continuous factors are named only away from their phrase boundaries (a face with pose 0.3 is
neither "facing forward" nor "facing right" and never gets a pose phrase), so every phrase is
unambiguous. :func:`named_factors` reads a caption back into the factors it names;
:func:`phrase_holds` says whether a factor value fits a phrase (exactly, for training labels) and
:func:`phrase_reads_true` whether a classifier reading does (with the boundary in the middle of
the gap between phrases).

The tokenizer is a ``CLIPTokenizer`` whose vocabulary holds the whole caption words. CLIP's
tokenizer is a BPE: with an empty merge list every word falls apart into characters and maps to
the unknown token, so :func:`tokenizer_files` also writes the merges that assemble each caption
word (left to right) and the partial words they pass through; every caption word then encodes as
exactly one token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from hspace.toy.world import BINARY_FACTORS, FaceFactors, sample_factors

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the padding and unknown token, as in CLIP
END_OF_WORD = "</w>"

#: Probability that a caption is empty (classifier-free guidance's unconditional share).
EMPTY_CAPTION_RATE = 0.15
#: Probability that a caption names each namable factor (at least one is named when non-empty).
NAME_RATE = 0.5
#: Tokens per caption, bos and eos included (the longest caption has 22).
MAX_TOKENS = 32


@dataclass(frozen=True)
class Phrase:
    """One caption phrase: the factor it names and the interval of values it stands for.

    ``low`` / ``high`` bound the factor values that get the phrase (inclusive); ``check_low`` /
    ``check_high`` bound the classifier readings that count as the phrase being true (for binary
    factors the logit: > 0 is present).
    """

    text: str
    factor: str
    low: float
    high: float
    check_low: float
    check_high: float


_INF = float("inf")


def _binary(factor: str, yes: str, no: str) -> list[Phrase]:
    return [Phrase(yes, factor, 1, 1, 0.0, _INF), Phrase(no, factor, 0, 0, -_INF, 0.0)]


#: Every phrase, in caption order (a caption lists its phrases in this order).
PHRASES: tuple[Phrase, ...] = tuple(
    _binary("grey_hair", "grey hair", "dark hair")
    + _binary("glasses", "glasses", "no glasses")
    + _binary("hat", "hat", "no hat")
    + _binary("eyes_open", "eyes open", "eyes closed")
    + [
        Phrase("smiling", "smile", 0.6, 1.0, 0.45, _INF),
        Phrase("not smiling", "smile", 0.0, 0.3, -_INF, 0.45),
        Phrase("facing left", "pose", -1.0, -0.4, -_INF, -0.275),
        Phrase("facing forward", "pose", -0.15, 0.15, -0.275, 0.275),
        Phrase("facing right", "pose", 0.4, 1.0, 0.275, _INF),
        Phrase("light skin", "skin_tone", -1.0, -0.4, -_INF, 0.0),
        Phrase("dark skin", "skin_tone", 0.4, 1.0, 0.0, _INF),
    ]
)
PHRASE_BY_TEXT: dict[str, Phrase] = {p.text: p for p in PHRASES}
#: Factors a caption can name, in caption order.
CAPTION_FACTORS: tuple[str, ...] = tuple(dict.fromkeys(p.factor for p in PHRASES))
#: Whole words of the vocabulary (the comma separates phrases).
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted({w for p in PHRASES for w in p.text.split()} | {","}, key=lambda w: (w == ",", w))
)


def phrase_holds(phrase: Phrase | str, value: float) -> bool:
    """Whether an exact factor value gets ``phrase`` (the rule captions are drawn by)."""
    p = PHRASE_BY_TEXT[phrase] if isinstance(phrase, str) else phrase
    return p.low <= float(value) <= p.high


def phrase_reads_true(phrase: Phrase | str, reading: float) -> bool:
    """Whether a classifier reading (logit for binary factors, value otherwise) fits ``phrase``."""
    p = PHRASE_BY_TEXT[phrase] if isinstance(phrase, str) else phrase
    return p.check_low < float(reading) < p.check_high


def namable_phrases(factors: FaceFactors) -> list[Phrase]:
    """The phrases that describe ``factors`` truly, one per namable factor, in caption order."""
    values = vars(factors)
    return [p for p in PHRASES if phrase_holds(p, values[p.factor])]


def caption_for(factors: FaceFactors, rng: np.random.Generator) -> str:
    """A random caption of a face: empty with :data:`EMPTY_CAPTION_RATE`, else a true subset."""
    if rng.random() < EMPTY_CAPTION_RATE:
        return ""
    phrases = namable_phrases(factors)
    keep = rng.random(len(phrases)) < NAME_RATE
    if not keep.any():
        keep[rng.integers(len(phrases))] = True
    return ", ".join(p.text for p, k in zip(phrases, keep, strict=True) if k)


def caption_seed(seed: int, draw: int = 0) -> tuple[str, FaceFactors]:
    """Caption number ``draw`` of face ``seed``, with the face's factors (deterministic)."""
    factors = sample_factors(seed)
    return caption_for(factors, np.random.default_rng([int(seed), int(draw), 0xCA97])), factors


def named_factors(caption: str) -> dict[str, Phrase]:
    """The factors a caption names, with their phrases; raises ``ValueError`` on an unknown phrase.

    Phrases are separated by commas, in any order; a factor named twice is an error.
    """
    out: dict[str, Phrase] = {}
    text = " ".join(caption.lower().split())
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if part not in PHRASE_BY_TEXT:
            raise ValueError(f"unknown caption phrase {part!r}; known: {sorted(PHRASE_BY_TEXT)}")
        p = PHRASE_BY_TEXT[part]
        if p.factor in out:
            raise ValueError(f"caption {caption!r} names {p.factor!r} twice")
        out[p.factor] = p
    return out


def is_binary(factor: str) -> bool:
    return factor in BINARY_FACTORS


# ----------------------------------------------------------------------------------------------
# tokenizer vocabulary
# ----------------------------------------------------------------------------------------------


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + END_OF_WORD]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as CLIP does it: merge the lowest-ranked adjacent pair until none is known."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(pairwise(symbols))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocabulary(words: tuple[str, ...] = CAPTION_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and BPE merges under which every word in ``words`` is one token.

    Merges are added at the lowest priority, one word at a time, each joining the first two pieces
    of the word's current split; a merge added later never applies to a word already whole, so
    the words stay whole. Ids: bos 0, eos 1, then tokens in the order they first appear.
    """
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for word in words:
        for s in _symbols(word):
            add(s)
        while len(pieces := _bpe(_symbols(word), ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
    return vocab, merges


def word_token_ids() -> dict[str, int]:
    """Token id of each caption word."""
    vocab, _ = build_vocabulary()
    return {w: vocab[w + END_OF_WORD] for w in CAPTION_WORDS}


def tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for ``CLIPTokenizer``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary()
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for stale in ("tokenizer.json", "special_tokens_map.json"):
        (directory / stale).unlink(missing_ok=True)
    return directory


def load_tokenizer(directory: str | Path | None = None):
    """A ``CLIPTokenizer`` over the caption vocabulary (written to a temporary folder if none given)."""
    import tempfile

    from transformers import CLIPTokenizer

    if directory is None:
        with tempfile.TemporaryDirectory() as tmp:
            return CLIPTokenizer.from_pretrained(tokenizer_files(tmp))
    return CLIPTokenizer.from_pretrained(directory)
