"""Captions of the text toy say only what is true of their face, and its tokenizer knows their words."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hspace.toy.captions import (
    CAPTION_FACTORS,
    CAPTION_WORDS,
    EMPTY_CAPTION_RATE,
    MAX_TOKENS,
    PHRASES,
    build_vocabulary,
    caption_seed,
    load_tokenizer,
    named_factors,
    phrase_holds,
    phrase_reads_true,
    tokenizer_files,
    word_token_ids,
)
from hspace.toy.world import GLASSES_GIVEN_DARK, GLASSES_GIVEN_GREY

N = 4000  # captions drawn per statistical test; binomial standard errors below 0.01
SEEDS = range(7_000_000, 7_000_000 + N)


@pytest.fixture(scope="module")
def drawn():
    return [caption_seed(s) for s in SEEDS]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_every_phrase_a_caption_names_is_true_of_its_face(drawn):
    named_any = 0
    for caption, factors in drawn:
        for factor, phrase in named_factors(caption).items():
            assert phrase_holds(phrase, vars(factors)[factor]), (caption, factors)
            named_any += 1
    assert named_any > N  # the test saw many phrases, not only empty captions


def test_a_share_of_captions_is_empty(drawn):
    empty = np.mean([c == "" for c, _ in drawn])
    assert abs(empty - EMPTY_CAPTION_RATE) < 0.03, empty  # 3 binomial standard errors at N = 4000


def test_every_factor_and_phrase_is_named_by_some_captions(drawn):
    counts = {p.text: 0 for p in PHRASES}
    for caption, _ in drawn:
        for phrase in named_factors(caption).values():
            counts[phrase.text] += 1
    assert all(n >= 50 for n in counts.values()), counts


def test_naming_grey_hair_keeps_the_worlds_glasses_correlation(drawn):
    """Unnamed factors are the world's own: glasses stay 0.8 on grey-haired faces, 0.2 on dark-haired."""
    for phrase, expected in (("grey hair", GLASSES_GIVEN_GREY), ("dark hair", GLASSES_GIVEN_DARK)):
        faces = [f for c, f in drawn if getattr(named_factors(c).get("grey_hair"), "text", None) == phrase]
        assert len(faces) > 500
        rate = np.mean([f.glasses for f in faces])
        assert abs(rate - expected) < 0.05, (phrase, rate)  # standard error about 0.018


def test_phrases_of_one_factor_never_overlap():
    for factor in CAPTION_FACTORS:
        ps = sorted((p for p in PHRASES if p.factor == factor), key=lambda p: p.low)
        for a, b in zip(ps, ps[1:], strict=False):
            assert a.high < b.low, (a, b)  # exact values: a gap or a step between phrases
            assert a.check_high <= b.check_low, (a, b)  # classifier readings: no value fits both
        for p in ps:
            assert p.check_low <= p.low and p.high <= p.check_high, p  # every true value reads true


def test_classifier_readings_are_judged_at_the_middle_of_the_gap():
    assert phrase_reads_true("glasses", 0.5) and not phrase_reads_true("glasses", -0.5)
    assert phrase_reads_true("no glasses", -3.0) and not phrase_reads_true("no glasses", 3.0)
    assert phrase_reads_true("facing left", -0.3) and not phrase_reads_true("facing left", -0.25)
    assert phrase_reads_true("facing forward", 0.25) and not phrase_reads_true("facing forward", 0.3)


def test_named_factors_reads_any_order_and_spacing():
    got = named_factors(" facing left ,  Grey hair,glasses")
    assert {f: p.text for f, p in got.items()} == {
        "pose": "facing left",
        "grey_hair": "grey hair",
        "glasses": "glasses",
    }
    assert named_factors("") == {} and named_factors("   ") == {}


@pytest.mark.parametrize("bad", ["purple hair", "grey hair, dark hair", "glasses,", "hat, , glasses"])
def test_named_factors_refuses_unknown_or_contradictory_phrases(bad):
    with pytest.raises(ValueError):
        named_factors(bad)


def test_every_caption_word_is_one_token(tokenizer):
    ids = word_token_ids()
    for word in CAPTION_WORDS:
        assert tokenizer(word).input_ids == [tokenizer.bos_token_id, ids[word], tokenizer.eos_token_id], word
    assert len(set(ids.values())) == len(CAPTION_WORDS)
    assert tokenizer.unk_token_id not in ids.values()


def test_captions_round_trip_through_the_tokenizer(tokenizer, drawn):
    for caption, _ in drawn[:500]:
        enc = tokenizer(caption, padding="max_length", max_length=MAX_TOKENS)
        assert len(enc.input_ids) == MAX_TOKENS  # every caption fits, none is truncated
        decoded = tokenizer.decode(enc.input_ids, skip_special_tokens=True)
        assert decoded.replace(" ,", ",") == caption


def test_the_vocabulary_files_hold_the_whole_words_and_the_special_tokens(tmp_path):
    d = tokenizer_files(tmp_path / "tok")
    vocab = json.loads((d / "vocab.json").read_text())
    assert vocab["<|startoftext|>"] == 0 and vocab["<|endoftext|>"] == 1
    assert all(w + "</w>" in vocab for w in CAPTION_WORDS)
    merges = (d / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version")
    for line in merges[1:]:  # each merge joins two known tokens into a known token
        a, b = line.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, line
    assert build_vocabulary() == build_vocabulary()  # deterministic
