"Text tools: sentence splitting, DreamLIP sub-caption sampling, rule-based hard negatives, and collation of all three."
import random
from collections import Counter

import pytest
import torch

from vlwb.core import TextKind
from vlwb.data import PairCollate
from vlwb.text import (Tokenizer, split_sentences, sample_subcaptions, subcaption_pool, hard_negatives, noun_phrases,
                       tokenize_words, NEGATIVE_KINDS, NOUNS)

LONG = ("A brown dog runs on the beach. The dog holds a red ball. Waves break behind it. "
        "A man in a blue shirt watches from a bench. The sky is clear.")


def test_split_sentences_keeps_abbreviations_and_numbers():
    assert split_sentences("It costs 3.5 dollars, e.g. A lot. Dr. Who waves! Really?") == \
        ["It costs 3.5 dollars, e.g. A lot.", "Dr. Who waves!", "Really?"]
    assert split_sentences("  ") == [] and split_sentences("one sentence without end") == ["one sentence without end"]


def test_subcaption_sampling_covers_the_sentences():
    sentences = split_sentences(LONG)
    assert len(sentences) == 5
    r = random.Random(0)
    seen = Counter(s for _ in range(200) for s in sample_subcaptions(LONG, 2, r))
    assert set(seen) == set(sentences) and min(seen.values()) > 40 # each drawn, roughly uniformly (80 expected)
    assert sorted(sample_subcaptions(LONG, 5, r)) == sorted(sentences) # k == pool: every sentence exactly once
    assert Counter(sample_subcaptions(LONG, 7, r)).most_common(1)[0][1] == 2 # beyond the pool: repeats start


def test_merged_subcaptions_are_runs_of_neighbours():
    sentences = split_sentences(LONG)
    pool = subcaption_pool(sentences, merge=3)
    assert len(pool) == 5 + 4 + 3
    joined = {" ".join(sentences[i:i + w]) for w in (2, 3) for i in range(6 - w)}
    assert set(pool[5:]) == joined
    r = random.Random(1)
    assert set(s for _ in range(100) for s in sample_subcaptions(sentences, 3, r, merge=3)) == set(pool)


def _words(t):
    return Counter("a" if w.lower() == "an" else w.lower() for w in tokenize_words(t))


@pytest.mark.parametrize("caption", [
    "a red circle to the left of a blue square", "A brown dog is chasing a white cat on the grass.",
    "An astronaut rides a horse", "two small yellow birds sitting on a large wooden bench",
    "a man holding a black umbrella next to a red car", "an orange cat sleeps under a green table"])
def test_swaps_keep_the_words_and_change_the_text(caption):
    negs = hard_negatives(caption, ["swap_attribute", "swap_relation"], per_kind=5)
    assert negs, caption
    for n in negs:
        assert n["text"] != caption and _words(n["text"]) == _words(caption), n


def test_swap_examples():
    neg = lambda c, k: [n["text"] for n in hard_negatives(c, [k], per_kind=5)]
    assert neg("A brown dog is chasing a white cat.", "swap_relation") == ["A white cat is chasing a brown dog."]
    assert neg("a small red circle and a large blue square", "swap_attribute") == \
        ["a large blue circle and a small red square"]
    assert neg("a horse below an astronaut", "swap_relation") == ["an astronaut below a horse"]


def test_replacements_change_one_word_within_its_category():
    for n in hard_negatives("a dog on a sofa next to a red ball", ["replace_object", "replace_attribute"], per_kind=20):
        diff_new, diff_old = _words(n["text"]) - _words("a dog on a sofa next to a red ball"), \
            _words("a dog on a sofa next to a red ball") - _words(n["text"])
        assert sum(diff_new.values()) == 1 and sum(diff_old.values()) == 1, n
        (new,), (old,) = diff_new, diff_old
        if n["kind"] == "replace_object": assert NOUNS[new] == NOUNS[old]


def test_what_the_parser_does_not_know_yields_nothing():
    assert hard_negatives("it is what it is", NEGATIVE_KINDS) == []
    assert [(p.start, p.end) for p in noun_phrases(tokenize_words("the quick zorblax near a tree"))] == [(4, 6)]
    with pytest.raises(KeyError, match="swap_colour"): hard_negatives("a dog", ["swap_colour"])


def test_collate_sub_captions_and_negatives():
    items = [{"image": torch.zeros(3, 8, 8), "captions": ["a dog on the beach"],
              "meta": {"long": LONG, "negatives": [{"text": "a cat on the beach", "kind": "replace_object"},
                                                   {"text": "a beach on the dog", "kind": "swap_relation"}]}},
             {"image": torch.ones(3, 8, 8), "captions": ["a man"], "meta": {"long": "A man. A bench. The sky."}}]
    tok = Tokenizer(24)
    b = PairCollate(tok, n_subcaptions=3, n_negatives=2, seed=0)(items)
    assert b.text_image.tolist() == [0, 1, 0, 0, 0, 1, 1, 1, -1, -1]
    assert b.text_kind.tolist() == [TextKind.caption] * 2 + [TextKind.subcaption] * 6 + [TextKind.negative] * 2
    assert b.caption_index().tolist() == [0, 1]
    subs0 = {tuple(r.tolist()) for r in b.text_ids[2:5]}
    assert subs0 <= {tuple(tok(s)[0][0].tolist()) for s in split_sentences(LONG)} and len(subs0) == 3
    again = PairCollate(tok, n_subcaptions=3, n_negatives=2, seed=0)(items)
    assert torch.equal(again.text_ids, b.text_ids) # a seeded collate samples the same texts


def test_negatives_never_replace_a_word_by_a_synonym_or_hypernym():
    "Replacing man by person, bike by bicycle or sofa by couch leaves the caption true: such edits are never negatives."
    from vlwb.text import hard_negatives, may_name_same
    for a, b in [("man", "person"), ("bike", "bicycle"), ("sofa", "couch"), ("puppy", "dog"), ("airplane", "plane"),
                 ("kitten", "cat"), ("woman", "lady"), ("small", "tiny"), ("large", "big")]:
        assert may_name_same(a, b) and may_name_same(b, a), (a, b)
        texts = {n["text"] for n in hard_negatives(f"a {a} beside a red car", ["replace_object", "replace_attribute"],
                                                   per_kind=200)}
        assert f"a {b} beside a red car" not in texts and texts, (a, b, texts)
    # real replacements still happen
    texts = {n["text"] for n in hard_negatives("a man beside a red car", ["replace_object"], per_kind=200)}
    assert {"a woman beside a red car", "a man beside a red bus"} <= texts
