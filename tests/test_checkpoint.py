"Checkpoints: safetensors + JSON round trips, and pickles refused."
import json
import pickle
import pytest
import torch

import vlwb
from vlwb.core import save_checkpoint, UnsafeCheckpointError
from vlwb.models import create_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("builtin:micro").eval()


def test_round_trip_gives_identical_outputs(model, tmp_path):
    save_checkpoint(model, tmp_path / "ck", extra={"global_step": 5})
    loaded = vlwb.load(tmp_path / "ck")
    x = torch.randn(3, 3, 64, 64)
    texts = ["a small red circle at the top left", "a large blue cross"]
    with torch.no_grad():
        a, b = model.encode_image(x, attn=True), loaded.encode_image(x, attn=True)
        assert torch.equal(a.embed, b.embed) and torch.equal(a.tokens, b.tokens)
        assert all(torch.equal(p, q) for p, q in zip(a.attn, b.attn))
        assert torch.equal(model.encode_text(texts).tokens, loaded.encode_text(texts).tokens)
    assert torch.equal(model.scale, loaded.scale)
    # the file named directly works too, and the config says how to rebuild the model
    assert vlwb.load(tmp_path / "ck" / "model.safetensors").spec == model.spec
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["global_step"] == 5


def test_overwrite_leaves_no_temp_files(model, tmp_path):
    save_checkpoint(model, tmp_path)
    save_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_checkpoint_is_refused(model, tmp_path, writer):
    save_checkpoint(model, tmp_path)
    target = tmp_path / "model.safetensors"
    if writer == "torch.save": torch.save(model.state_dict(), target)
    else: target.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(UnsafeCheckpointError, match="never unpickles"): vlwb.load(tmp_path)


def test_lightning_style_ckpt_file_is_refused(model, tmp_path):
    torch.save({"state_dict": model.state_dict()}, tmp_path / "last.ckpt")
    (tmp_path / "config.json").write_text(json.dumps({"spec": model.spec}))
    with pytest.raises(UnsafeCheckpointError, match="last.ckpt"): vlwb.load(tmp_path / "last.ckpt")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"): vlwb.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"): vlwb.load(tmp_path / "empty")


def test_corrupt_safetensors_is_named(model, tmp_path):
    save_checkpoint(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="model.safetensors"): vlwb.load(tmp_path)
