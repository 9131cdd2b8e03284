"Dirty data: every kind of bad or unusual input is converted correctly or skipped with a counted reason."
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlwb.records import ImageCaptionDataset
from vlwb.data import PairCollate, check_pairs, open_pairs
from vlwb.images import BadSample, load_image, tensor_to_image
from vlwb.shards import ShardWriter
from vlwb.text import Tokenizer


def _bomb_png(w=40_000, h=40_000) -> bytes:
    "A tiny PNG whose header claims w x h pixels (a decompression bomb as far as the header says)."
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "png")
    b = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", w, h) + bytes(b[24:29])
    b[16:29] = ihdr
    b[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(b)


@pytest.fixture()
def dirty(tmp_path):
    "A folder holding one image of each unusual kind and one record of each bad kind, with a JSONL listing them."
    d = tmp_path / "dirty"
    d.mkdir()
    Image.new("RGB", (20, 10), (200, 30, 40)).save(d / "rgb.png")
    Image.new("L", (10, 10), 77).save(d / "grey.png")
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 5, 10))
    rgba.save(d / "rgba.png")
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=100) # pure red in CMYK
    Image.fromarray(np.full((10, 10), 65535 // 2, np.uint16)).save(d / "sixteen.png")
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.paste(0, (0, 0, 10, 5))
    pal.save(d / "palette.png", transparency=0)
    rot = Image.new("RGB", (30, 10), (0, 0, 0))
    rot.paste((255, 255, 255), (0, 0, 10, 10)) # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6 # rotate 90 degrees clockwise to display
    rot.save(d / "rotated.jpg", exif=exif, quality=100)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, "jpeg")
    (d / "truncated.jpg").write_bytes(good.getvalue()[:300])
    (d / "garbage.png").write_bytes(b"this is not an image at all")
    (d / "bomb.png").write_bytes(_bomb_png())
    lines = [json.dumps({"image": n, "caption": f"image {n}"}) for n in
             ("rgb.png", "grey.png", "rgba.png", "cmyk.jpg", "sixteen.png", "palette.png", "rotated.jpg",
              "truncated.jpg", "garbage.png", "bomb.png", "missing.png")]
    lines += [json.dumps({"image": "rgb.png", "caption": "   "}), json.dumps({"image": "rgb.png"}), "{not json",
              json.dumps({"image": "rgb.png", "caption": ["ok", 3]})]
    raw = "\n".join(lines).encode() + b"\n" + b'{"image": "rgb.png", "caption": "caf\xe9"}\n' # latin-1, not UTF-8
    (d / "pairs.jsonl").write_bytes(raw)
    return d


GOOD = 7 # rgb, grey, rgba, cmyk, sixteen, palette, rotated
SKIPPED_AT_READ = {"empty caption": 2, "bad JSON line": 1, "caption not text": 1, "not UTF-8": 1}
SKIPPED_AT_DECODE = {"corrupt image": 1, "not an image": 1, "too many pixels": 1, "missing image": 1}


def test_unusual_images_are_converted_correctly(dirty):
    px = lambda name, xy=(2, 2): load_image(dirty / name).getpixel(xy)
    assert px("grey.png") == (77, 77, 77)
    assert px("rgba.png", (1, 5)) == (255, 255, 255) and px("rgba.png", (8, 5)) == (0, 0, 255) # transparent -> white
    r, g, b = px("cmyk.jpg")
    assert r > 240 and g < 15 and b < 15
    assert px("sixteen.png") == (127, 127, 127) # 16-bit mid grey scaled to 8 bits, not clipped to white
    assert px("palette.png", (5, 2)) == (255, 255, 255) and px("palette.png", (5, 8)) == (0, 200, 0)
    im = load_image(dirty / "rotated.jpg")
    assert im.size == (10, 30) and im.getpixel((5, 3))[0] > 200 and im.getpixel((5, 25))[0] < 50 # white now on top


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "corrupt image"), ("garbage.png", "not an image"),
                                         ("bomb.png", "too many pixels"), ("missing.png", "missing image")])
def test_bad_images_raise_a_named_reason(dirty, name, reason):
    with pytest.raises(BadSample, match=name) as e: load_image(dirty / name)
    assert e.value.reason == reason


def test_dataset_skips_and_counts_every_bad_kind(dirty):
    ds = ImageCaptionDataset(dirty / "pairs.jsonl", preprocess=16)
    assert dict(ds.skipped) == SKIPPED_AT_READ
    items = [ds[i] for i in range(len(ds))]
    assert sum(it is not None for it in items) == GOOD
    assert dict(ds.skipped) == {**SKIPPED_AT_READ, **SKIPPED_AT_DECODE}
    # training goes on: batches of the good samples only
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=PairCollate(Tokenizer(16), train=False))
    batches = list(loader)
    assert batches[-1] is None # records 8-10 are all bad: that batch is skipped as a whole
    assert sum(b.n_images for b in batches[:-1]) == GOOD
    assert tuple(np.asarray(tensor_to_image(batches[0].images[1]))[8, 8]) == (77, 77, 77)


def test_training_runs_through_dirty_data(dirty, tmp_path):
    from vlwb.data import PairDataModule
    from vlwb.train import VLModule, make_trainer
    dm = PairDataModule(str(dirty / "pairs.jsonl"), batch_size=2, seed=0)
    trainer = make_trainer(tmp_path / "run", max_steps=6, progress=False)
    trainer.fit(VLModule("builtin:micro", warmup_steps=1), dm)
    assert trainer.global_step == 6


def test_data_check_counts_by_reason(dirty):
    report = check_pairs(dirty / "pairs.jsonl", progress=False)
    assert report["good"] == GOOD and report["skipped"] == {**SKIPPED_AT_READ, **SKIPPED_AT_DECODE}
    assert report["records"] == GOOD + sum(SKIPPED_AT_READ.values()) + sum(SKIPPED_AT_DECODE.values())
    assert any("bomb.png" in m for m in report["examples"]["too many pixels"])


def test_folder_with_missing_and_non_utf8_captions(tmp_path):
    for n in ("a", "b", "c", "d"): Image.new("RGB", (8, 8), "red").save(tmp_path / f"{n}.png")
    (tmp_path / "a.txt").write_text("a red square\n\nanother caption\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "c.txt").write_text("\n  \n")
    ds = ImageCaptionDataset(tmp_path)
    assert [r["captions"] for r in ds.records] == [["a red square", "another caption"]]
    assert dict(ds.skipped) == {"not UTF-8": 1, "empty caption": 1, "no caption file": 1}


def test_shards_skip_bad_samples(tmp_path, dirty):
    with ShardWriter(tmp_path / "s.tar") as w:
        w.write("good", {"png": (dirty / "rgb.png").read_bytes(), "txt": "a red image"})
        w.write("garbage", {"png": b"nope", "txt": "x"})
        w.write("nocaption", {"png": (dirty / "rgb.png").read_bytes(), "txt": "  \n"})
        w.write("badjson", {"png": (dirty / "rgb.png").read_bytes(), "json": b"{oops"})
        w.write("latin", {"png": (dirty / "rgb.png").read_bytes(), "txt": b"caf\xe9"})
    ds = open_pairs(tmp_path / "s.tar", preprocess=8)
    assert [it["captions"] for it in ds] == [["a red image"]]
    assert dict(ds.skipped) == {"not an image": 1, "empty caption": 1, "bad JSON": 1, "not UTF-8": 1}
    report = check_pairs(tmp_path / "s.tar", progress=False)
    assert report["good"] == 1 and sum(report["skipped"].values()) == 4


def test_truncated_shard_yields_what_it_holds(tmp_path, dirty):
    with ShardWriter(tmp_path / "s.tar") as w:
        for k in range(4): w.write(f"k{k}", {"png": (dirty / "rgb.png").read_bytes(), "txt": f"caption {k}"})
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    got = [it["captions"][0] for it in open_pairs(tmp_path / "cut.tar", preprocess=8)]
    assert 1 <= len(got) < 4 and got == [f"caption {k}" for k in range(len(got))]
