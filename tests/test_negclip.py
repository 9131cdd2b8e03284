"""NegCLIP's batches: each sample brings one of its nearest-neighbour images (table cached per model and dataset, never
read stale), and its text negatives are edits of the caption drawn that step."""
import os

import torch

from vlwb.records import ImageCaptionDataset
from vlwb.data import PairDataModule, WithNeighbours
from vlwb.models import create_model
from vlwb.train import image_neighbours, dataset_fingerprint


def _counting(model):
    calls = []
    encode = model.encode_image
    model.encode_image = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    return calls


def test_neighbour_table_is_cached_and_invalidated(tmp_path, world):
    import shutil
    d = tmp_path / "w"
    shutil.copytree(world["train"].parent, d)
    ds = ImageCaptionDataset(d / "train.jsonl", masks=False)
    torch.manual_seed(0)
    m = create_model("builtin:micro")
    calls = _counting(m)
    t1 = image_neighbours(m, ds, k=3, progress=False)
    assert sum(calls) == len(ds) and t1.shape == (len(ds), 3)
    assert not (t1 == torch.arange(len(ds))[:, None]).any()
    # exact: the table is the top-3 cosine neighbours of the model's own embeddings
    E = torch.cat([m.encode_image(torch.stack([ds[i]["image"] for i in range(len(ds))])).embed]).detach()
    sim = E @ E.T
    sim.fill_diagonal_(-2)
    assert torch.equal(t1, sim.topk(3, dim=1).indices)
    calls.clear()
    assert torch.equal(image_neighbours(m, ds, k=3, progress=False), t1) and calls == [] # the cache, not the model
    with torch.no_grad(): next(m.parameters()).add_(0.5) # another model: recomputed
    image_neighbours(m, ds, k=3, progress=False)
    assert sum(calls) == len(ds)
    calls.clear()
    img = ds.image_path(0)
    st = img.stat()
    before = dataset_fingerprint(ds)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000)) # an image changed on disk: recomputed
    assert dataset_fingerprint(ds) != before
    image_neighbours(m, ImageCaptionDataset(d / "train.jsonl", masks=False), k=3, progress=False)
    assert sum(calls) == len(ds)
    assert len(list((d / ".vlwb-cache").glob("neighbours-*.safetensors"))) == 3


def test_batches_hold_neighbours_and_negatives_of_the_drawn_caption(world):
    dm = PairDataModule(str(world["train"]), batch_size=4, n_negatives=1, negatives_from_caption=True)
    dm.setup("fit")
    table = torch.stack([(torch.arange(3) + i + 1) % len(dm.train_ds) for i in range(len(dm.train_ds))])
    dm.neighbours = table
    batch = next(iter(dm.train_dataloader()))
    assert batch.n_images == 8 # 4 anchors, then their 4 neighbours
    anchors, neighbours = batch.meta[:4], batch.meta[4:]
    index = {r["image"]: i for i, r in enumerate(dm.train_ds.records)}
    for a, n in zip(anchors, neighbours): assert index[n["image"]] in table[index[a["image"]]].tolist()
    caps = batch.caption_index()
    negs = (batch.text_image < 0).nonzero().flatten()
    assert len(negs) >= 6 # one per image, where the caption has an editable structure
    tok = dm.tokenizer._bpe
    decode = lambda ids: tok.decode([int(i) for i in ids
                                     if int(i) not in (0, tok.sot_token_id, tok.eot_token_id)]).strip()
    captions = [decode(batch.text_ids[c]) for c in caps]
    for n in negs:
        neg = decode(batch.text_ids[n])
        assert neg not in captions
        words = lambda t: [w for w in t.replace(",", " ").split() if w not in ("a", "an")]
        # an edit of one of the batch's captions: the same words reordered, or one word replaced
        assert any(sorted(words(neg)) == sorted(words(c)) or len(set(words(neg)) ^ set(words(c))) <= 2
                   for c in captions), neg


def test_with_neighbours_draws_per_step():
    class Ds(torch.utils.data.Dataset):
        def __len__(self): return 10
        def __getitem__(self, k): return k
    w = WithNeighbours(Ds(), torch.tensor([[1, 2, 3]] * 10))
    drawn = {w[(0, d)][1][0] for d in range(50)}
    assert drawn == {1, 2, 3}
