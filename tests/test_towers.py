"""The towers backend on its real pretrained weights (EfficientNet-lite0, all-MiniLM-L6-v2, both from the package
index): a short training run through `VLModule` with `clip` + `structure` leaves the frozen towers bit-identical (batch
norm statistics included) and trains the heads; the data reaching the model is what its own tokenizer and preprocessing
make; a saved run loads back; bad names say what is valid."""
import pytest
import torch

from vlwb.data import PairDataModule
from vlwb.models import create_model, load
from vlwb.train import VLModule, make_trainer


@pytest.fixture(scope="module")
def towers():
    return create_model("towers:efficientnet-lite0+minilm", image_size=64, embed_dim=32)


def test_frozen_towers_stay_bit_identical_and_heads_train(world, tmp_path):
    module = VLModule("towers:efficientnet-lite0+minilm", model_config={"image_size": 64, "embed_dim": 32},
                      objectives={"clip": 1.0, "structure": {"weight": 10.0, "warmup_steps": 2}}, warmup_steps=1,
                      lr=1e-2)
    m = module.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    make_trainer(tmp_path, max_steps=3, progress=False).fit(module, PairDataModule(str(world["train"]), batch_size=8))
    after = m.state_dict()
    towers = [k for k in before if k.startswith(("image_tower.", "text_tower."))]
    assert any("running_mean" in k for k in towers)  # batch-norm statistics are checked too
    assert all(torch.equal(before[k], after[k]) for k in towers)
    assert all(p.grad is None or not p.requires_grad for p in m.image_tower.parameters())
    heads = [k for k in before if k.startswith(("image_head.", "text_head."))]
    assert heads and all(not torch.equal(before[k], after[k]) for k in heads)
    logged = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "structure" in logged  # the regulariser was computed and logged
    reloaded = load(tmp_path / "checkpoint")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(x).embed, m.eval().encode_image(x).embed)


def test_the_data_follows_the_towers(towers, world):
    dm = PairDataModule(str(world["train"]), batch_size=4, tokenizer=towers.tokenizer, preprocess=towers.preprocess)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b.images.shape[-1] == 64
    ids, mask = towers.tokenize(["a red circle"])
    assert ids[0, 0].item() == towers.tokenizer.tok.cls_token_id  # WordPiece ids, not CLIP's BPE
    assert int(b.text_ids.max()) < towers.text_tower.net.config.vocab_size
    with torch.no_grad():
        te = towers.encode_text(b.text_ids, b.text_mask)
    assert te.embed.shape == (len(b.text_ids), 32) and te.features.shape[-1] == 384


def test_bad_tower_names(towers):
    with pytest.raises(KeyError, match="efficientnet-lite0"):
        create_model("towers:resnet-unknown+minilm")
    with pytest.raises(ValueError, match="IMAGE\\+TEXT"):
        create_model("towers:efficientnet-lite0")
    with pytest.raises(IndexError, match="valid -7..6"):
        create_model("towers:efficientnet-lite0+minilm", text_layer=7, image_size=64)
    with pytest.raises(ValueError, match="context_length 1000 exceeds .* 512 positions"): # tower and tokenizer named
        create_model("towers:efficientnet-lite0+minilm", context_length=1000, image_size=64)


def test_figures_explorer_and_report_work_on_towers(towers, world, tmp_path):
    "A convolutional image tower has no attention: the figures show its gradient x input map and the words' attention."
    from vlwb import interpret, viz
    from vlwb.widgets import Explorer
    ex = Explorer({"towers": towers}, source=world["test"])
    for tab in (0, 1, 2):
        ex.w_tabs.selected_index = tab
    assert [v for v, _ in ex.timings][-3:] == ["alignment", "attention", "compare"]
    x = interpret.prepare(towers, ex.entry["image"])
    e = interpret.explain(towers, x, "a red circle")
    assert e["image_method"] == "gradient x input" and e["image_attention"] is None
    assert e["image_relevance"].shape == e["grid"] and e["image_relevance"].sum() > 0
    assert e["text_attention"].shape[:2] == (6, 12)  # MiniLM: 6 layers of 12 heads
    fig = viz.explanation_figure(viz.model_view(towers, x), e)
    assert "gradient x input" in fig.layout.annotations[0].text


def test_feature_cache_is_keyed_by_towers_and_data(towers, world, tmp_path):
    "A cache file is read only when its stored key is the towers' and the data's; anything else is recomputed."
    import shutil
    from safetensors.torch import save_file
    from vlwb.frozen import cache_features, towers_key
    from vlwb.records import ImageCaptionDataset
    first = cache_features(towers, world["val"], tmp_path, progress=False)
    assert not first["cached"] and cache_features(towers, world["val"], tmp_path, progress=False)["cached"]
    key = towers_key(towers, ImageCaptionDataset(world["val"], towers.preprocess))
    (f,) = tmp_path.glob("*.safetensors")
    assert f.name == f"{key[:32]}.safetensors"
    # a file under the right name whose stored key is another model's is not read
    save_file({"image_map": torch.zeros(1)}, str(f), metadata={"key": "0" * 64})
    again = cache_features(towers, world["val"], tmp_path, progress=False)
    assert not again["cached"] and torch.equal(again["image_map"], first["image_map"])
    # another dataset (the same images, one caption changed) has another key
    other = tmp_path / "other"
    shutil.copytree(world["val"].parent, other, dirs_exist_ok=True)
    lines = (other / world["val"].name).read_text().splitlines()
    (other / world["val"].name).write_text("\n".join([lines[0].replace('"captions": ["', '"captions": ["one ')]
                                                     + lines[1:]) + "\n")
    assert not cache_features(towers, other / world["val"].name, tmp_path, progress=False)["cached"]
