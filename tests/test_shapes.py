"The shapes world: its objects, masks, relations, captions and hard negatives are what they claim to be."
import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from vlwb.records import read_records
from vlwb.shards import expand_shards, iter_tar_samples
from vlwb.shapes import (SHAPES, COLORS, RELATIONS, NEGATIVE_KINDS, generate_shapes_world, make_record, relation)
from vlwb.text import split_sentences


def _words(text):
    "The multiset of words, 'an' counted as 'a' (the article follows the word after it)."
    return Counter("a" if w == "an" else w for w in text.lower().split())


def _objects_fitting(objects, phrase):
    "Indices of the objects a phrase like 'a red circle' or 'a small red circle' describes."
    words = phrase.split()[1:]
    keys = {"shape": words[-1]}
    for w in words[:-1]: keys["color" if w in COLORS else "size"] = w
    return [k for k, o in enumerate(objects) if all(o[a] == v for a, v in keys.items())]


def _is_true(objects, text):
    "Is a short caption (an object, 'A and B', or 'A <relation> B') true of the scene? Judged from the record alone."
    for rel in RELATIONS:
        if f" {rel} " in text:
            a, b = text.split(f" {rel} ")
            return any(relation(objects[i], objects[j]) == rel for i in _objects_fitting(objects, a)
                       for j in _objects_fitting(objects, b) if i != j)
    return all(_objects_fitting(objects, p) for p in text.split(" and "))


@pytest.fixture(scope="module")
def records():
    return [make_record("train", i, seed=11)[0] for i in range(400)]


def test_world_covers_every_attribute_and_count(records):
    objs = [o for r in records for o in r["objects"]]
    assert {o["shape"] for o in objs} == set(SHAPES) and {o["color"] for o in objs} == set(COLORS)
    assert {o["size"] for o in objs} == {"small", "large"}
    assert set(Counter(len(r["objects"]) for r in records)) == {1, 2, 3, 4}


def test_masks_are_the_objects(records):
    for i in range(40):
        rec, img, labels = make_record("train", i, seed=11)
        assert set(np.unique(labels)) == set(range(len(rec["objects"]) + 1))
        for o in rec["objects"]:
            ys, xs = (labels == o["label"]).nonzero()
            x0, y0, x1, y1 = o["box"]
            assert len(xs) > 15 and x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and \
                ys.max() <= y1 + 1
            mean = img[labels == o["label"]].mean(0) # the mask's pixels carry the object's colour (+-15 jitter)
            assert np.abs(mean - np.array(COLORS[o["color"]])).max() <= 16


def test_relations_follow_the_centres(records):
    for r in records:
        for rel in r["relations"]:
            a, b = r["objects"][rel["subject"]]["center"], r["objects"][rel["object"]]["center"]
            dx, dy = a[0] - b[0], a[1] - b[1]
            expect = ("to the left of" if dx < 0 else "to the right of") if abs(dx) >= abs(dy) else \
                ("above" if dy < 0 else "below")
            assert rel["relation"] == expect


def test_captions_short_and_long_are_true(records):
    for r in records:
        for c in r["short"]: assert _is_true(r["objects"], c), (c, r["objects"])
        sentences = split_sentences(r["long"])
        assert 3 <= len(sentences) <= 8
        for o in r["objects"]: assert any(f"{o['size']} {o['color']} {o['shape']}" in s.lower() for s in sentences)


def test_hard_negatives_are_false_and_swaps_keep_the_words(records):
    kinds = Counter()
    for r in records:
        for n in r["negatives"]:
            kinds[n["kind"]] += 1
            assert n["text"] != n["positive"]
            assert _is_true(r["objects"], n["positive"]), n
            assert not _is_true(r["objects"], n["text"]), (n, r["objects"])
            if n["kind"].startswith("swap"): assert _words(n["text"]) == _words(n["positive"])
            else: # a replacement changes exactly one word
                assert sum((_words(n["text"]) - _words(n["positive"])).values()) == 1
    assert set(kinds) == set(NEGATIVE_KINDS) and min(kinds.values()) > 50, kinds


def test_splits_are_disjoint_and_deterministic(tmp_path):
    a = generate_shapes_world(tmp_path / "a", 30, 10, 20, seed=2, shard_size=16, progress=False)
    generate_shapes_world(tmp_path / "b", 30, 10, 20, seed=2, shard_size=16, workers=1, progress=False)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    files = lambda root: {p.relative_to(root).as_posix(): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}
    # byte-identical, PNGs and tar shards included, any worker count
    assert files(tmp_path / "a") == files(tmp_path / "b")
    pixels = {split: {digest(tmp_path / "a" / r["image"]) for r in read_records(a[split])} for split in a}
    assert not (pixels["train"] & pixels["test"]) and not (pixels["train"] & pixels["val"]) and \
        not (pixels["val"] & pixels["test"])


def test_shards_hold_the_jsonl_samples(tmp_path):
    paths = generate_shapes_world(tmp_path, 25, 0, 0, seed=4, shard_size=10, progress=False)
    shards = expand_shards(tmp_path / "shards" / "train-{000000..000002}.tar")
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert json.loads((tmp_path / "shards" / "train.json").read_text())["counts"] == [10, 10, 5]
    samples = [s for sh in shards for s in iter_tar_samples(sh)]
    recs = read_records(paths["train"])
    assert len(samples) == 25
    for (key, sample), rec in zip(samples, recs):
        assert key == f"train_{rec['image'][-10:-4]}" and set(sample) == {"png", "mask.png", "json"}
        assert sample["png"] == (tmp_path / rec["image"]).read_bytes()
        assert sample["mask.png"] == (tmp_path / rec["mask"]).read_bytes()
        assert {k: v for k, v in json.loads(sample["json"]).items()} == {k: v for k, v in rec.items() if k != "_line"}


def test_shards_read_by_the_webdataset_package(tmp_path):
    wds = pytest.importorskip("webdataset")
    generate_shapes_world(tmp_path, 12, 0, 0, seed=4, shard_size=5, progress=False)
    urls = [str(p) for p in sorted((tmp_path / "shards").glob("train-*.tar"))]
    got = [(s["__key__"], json.loads(s["json"])["caption"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert [k for k, _ in got] == [f"train_{i:06d}" for i in range(12)]
    assert got[3][1] == make_record("train", 3, seed=4)[0]["caption"]
