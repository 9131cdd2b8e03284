"The shapes world generator and the image-caption loader that reads it (and users' files)."
import hashlib
import json
import numpy as np
import pytest
import torch
from PIL import Image

from vlwb.records import ImageCaptionDataset, read_records
from vlwb.data import PairCollate
from vlwb.images import BadSample, load_image, tensor_to_image
from vlwb.shapes import generate_shapes_world, make_record, SHAPES, COLORS
from vlwb.text import Tokenizer, split_sentences


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a = generate_shapes_world(tmp_path / "a", 12, 2, 4, seed=7, progress=False)
    generate_shapes_world(tmp_path / "b", 12, 2, 4, seed=7, progress=False)
    c = generate_shapes_world(tmp_path / "c", 12, 2, 4, seed=8, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a["train"].read_text() != c["train"].read_text()


def test_loader_reads_what_the_generator_wrote(world):
    ds = ImageCaptionDataset(world["train"], preprocess=64)
    assert len(ds) == 48
    for i in (0, 17, 47):
        rec, pixels, labels = make_record("train", i, seed=0)
        item = ds[i]
        assert item["captions"] == rec["captions"] and item["captions"][0] == rec["caption"]
        assert item["meta"]["objects"] == rec["objects"]
        assert np.array_equal(np.asarray(load_image(ds.image_path(i))), pixels)
        # normalisation is undone exactly (up to rounding)
        assert np.abs(np.asarray(tensor_to_image(item["image"]), int) - pixels.astype(int)).max() <= 1
        # masks come back as the generator drew them, one per object, in the record's order
        assert torch.equal(item["masks"],
                           torch.from_numpy(labels[None] == np.arange(1, len(rec["objects"]) + 1)[:, None, None]))


def test_records_name_their_objects(world):
    for rec in read_records(world["test"]):
        assert 1 <= len(rec["objects"]) <= 4
        for o in rec["objects"]:
            assert o["shape"] in SHAPES and o["color"] in COLORS
            assert f"{o['color']} {o['shape']}" in rec["caption"]
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_collate_makes_a_pair_batch(world):
    ds = ImageCaptionDataset(world["val"])
    b = PairCollate(Tokenizer(32), train=False)([ds[i] for i in range(4)])
    assert b.images.shape == (4, 3, 64, 64) and b.text_ids.shape == (4, 32)
    assert b.text_image.tolist() == [0, 1, 2, 3] and b.caption_index().tolist() == [0, 1, 2, 3]
    assert [len(x) for x in b.boxes] == [len(ds.records[i]["objects"]) for i in range(4)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_user_formats(tmp_path, fmt):
    for name, colour in [("a.png", "red"), ("b.jpg", "blue")]: Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    rows = [("a.png", "a red picture"), ("b.jpg", "a blue, wide picture")]
    if fmt == "jsonl": text = "\n".join(json.dumps({"image": i, "caption": c}) for i, c in rows)
    else:
        sep = "," if fmt == "csv" else "\t"
        text = f"image{sep}caption\n" + "\n".join(f'{i}{sep}"{c}"' if sep == "," else f"{i}{sep}{c}" for i, c in rows)
    (tmp_path / f"pairs.{fmt}").write_text(text)
    ds = ImageCaptionDataset(tmp_path / f"pairs.{fmt}", preprocess=16)
    assert [ds.captions(i) for i in range(2)] == [["a red picture"], ["a blue, wide picture"]]
    assert ds[1]["image"].shape == (3, 16, 16)
    assert tuple(np.asarray(tensor_to_image(ds[0]["image"]))[8, 8]) == (255, 0, 0)


def test_several_captions_sampled_in_training(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.png", "captions": ["one", "two", "three"]}))
    ds = ImageCaptionDataset(tmp_path / "d.jsonl", preprocess=8)
    tok = Tokenizer(8)
    seen = {tuple(PairCollate(tok, train=True)([ds[0]]).text_ids[0].tolist()) for _ in range(40)}
    assert len(seen) == 3
    first = PairCollate(tok, train=False)([ds[0]]).text_ids[0]
    assert torch.equal(first, tok("one")[0][0])


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"): ImageCaptionDataset(tmp_path / "nothere.jsonl")


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl has no records"): ImageCaptionDataset(tmp_path / "empty.jsonl")


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"): read_records(tmp_path / "bad.jsonl")


def test_missing_and_corrupt_images_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": "c"})
                                                for n in ["gone.png", "broken.png"]))
    ds = ImageCaptionDataset(tmp_path / "d.jsonl", skip_bad=False)
    with pytest.raises(BadSample, match="gone.png"): ds[0]
    with pytest.raises(BadSample, match="broken.png"): ds[1]
    lenient = ImageCaptionDataset(tmp_path / "d.jsonl")
    assert lenient[0] is None and lenient[1] is None
    assert lenient.skipped == {"missing image": 1, "not an image": 1}


def test_unknown_format_is_named(tmp_path):
    (tmp_path / "d.parquet").write_text("")
    with pytest.raises(ValueError, match="d.parquet"): read_records(tmp_path / "d.parquet")


def test_caption_variants_always_name_every_shape(world):
    for rec in read_records(world["train"]):
        assert len(rec["captions"]) >= 2
        for cap in rec["captions"]:
            for o in rec["objects"]: assert o["shape"] in cap
            assert all(c not in cap for c in COLORS if c not in {o["color"] for o in rec["objects"]})


def test_real_sample_photos_load_with_their_texts():
    from pathlib import Path
    from vlwb.images import skimage_path
    path = Path(__file__).parent.parent / "data" / "skimage_samples.jsonl"
    ds = ImageCaptionDataset(path, preprocess=32)
    assert len(ds) == 19 and not ds.skipped
    modes = {Image.open(skimage_path(r["image"][len("skimage:"):])).mode for r in ds.records}
    assert {"RGB", "L", "RGBA"} <= modes # real files of every common mode, all decoded to RGB
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32)
        r = ds.records[i]
        assert r["captions"] and 3 <= len(split_sentences(r["long"])) <= 5 and r["negatives"]
        assert all(n["text"] != r["captions"][0] for n in r["negatives"])
    b = PairCollate(Tokenizer(32), train=False, n_subcaptions=2, n_negatives=1)([ds[i] for i in range(4)])
    assert b.n_images == 4 and (b.text_image == -1).sum() == 4
