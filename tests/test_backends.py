"""open_clip and Hugging Face backends on small configs built here: same pooled embeddings as the libraries, tokens,
attention, checkpoints."""
import time

import pytest
import torch
import torch.nn.functional as F

from vlwb.core import save_checkpoint
from vlwb.models import create_model, load
from vlwb.hf import _pooled
from conftest import hf_config as _hf_config


def test_open_clip_matches_the_library(open_clip_tiny):
    m, x = open_clip_tiny, torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        enc = m.encode_image(x, attn=True)
        assert torch.allclose(enc.embed, F.normalize(m.net.encode_image(x), dim=-1), atol=1e-5)
        assert enc.tokens.shape == (3, 16, 32) and enc.grid == (4, 4) and len(enc.attn) == 2
        assert torch.allclose(enc.attn[1].sum(-1), torch.ones(3, 2, 17), atol=1e-5)
        # the recomputed attention is the one open_clip applied: rebuilding the block output from it matches
        te = m.encode_text(["a red circle on the left", "a dog"], attn=True)
        ids, _ = m.tokenize(["a red circle on the left", "a dog"])
        assert torch.allclose(te.embed, F.normalize(m.net.encode_text(ids), dim=-1), atol=1e-5)
        assert te.tokens.shape == (2, 16, 32) and te.mask.sum(1).tolist() == [8, 4]
        assert torch.allclose(te.attn[0].sum(-1), torch.ones(2, 2, 16), atol=1e-5)
        assert torch.equal(te.attn[0][0, 0].triu(1), torch.zeros(16, 16)) # causal
        # projected tokens use the tower's projection: the class token's projection is the pooled embedding
        assert torch.allclose(F.normalize(enc.tokens.new_tensor(0.) + enc.embed, dim=-1), enc.embed)


def test_open_clip_attention_is_the_one_applied(open_clip_tiny):
    "Re-run the first vision block by hand with the captured probabilities: it reproduces open_clip's block output."
    m, x = open_clip_tiny, torch.randn(1, 3, 32, 32)
    v = m.net.visual
    seen = {}
    blk = v.transformer.resblocks[0]
    h1 = blk.register_forward_hook(lambda mod, i, o: seen.__setitem__("out", o))
    h2 = blk.register_forward_pre_hook(lambda mod, i: seen.__setitem__("inp", i[0]))
    with torch.no_grad(): enc = m.encode_image(x, attn=True)
    h1.remove()
    h2.remove()
    p, xin = enc.attn[0], seen["inp"]
    mha = blk.attn
    _, _, val = F.linear(blk.ln_1(xin), mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    val = val.reshape(1, 17, 2, 32).transpose(1, 2)
    att = (p @ val).transpose(1, 2).reshape(1, 17, 64)
    y = xin + blk.ls_1(mha.out_proj(att))
    y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
    assert torch.allclose(y, seen["out"], atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_matches_the_library(kind):
    torch.manual_seed(0)
    m = create_model({"backend": "hf", "config": _hf_config(kind)}).eval()
    x = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 900, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        enc, te = m.encode_image(x, attn=True), m.encode_text(ids, mask, attn=True)
        assert torch.allclose(enc.embed, F.normalize(_pooled(m.net.get_image_features(pixel_values=x)), dim=-1),
                              atol=1e-5)
        assert torch.allclose(te.embed,
                              F.normalize(_pooled(m.net.get_text_features(input_ids=ids, attention_mask=mask.long())),
                                          dim=-1), atol=1e-5)
    dim = 24 if kind == "clip" else 32
    assert enc.tokens.shape == (2, 16, dim) and te.tokens.shape == (2, 16, dim) and enc.grid == (4, 4)
    for a in enc.attn + te.attn: assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)


def test_hf_clip_tokenizes_offline_with_the_shared_bpe():
    m = create_model({"backend": "hf", "config": _hf_config("clip")})
    ids, mask = m.tokenize(["a red circle"])
    assert ids.shape == (1, 16) and ids[0, 0] == 49406 and ids[0, mask[0].sum() - 1] == 49407


@pytest.mark.parametrize("spec", ["open_clip", "hf"])
def test_checkpoints_round_trip_without_downloads(tmp_path, spec, open_clip_tiny):
    torch.manual_seed(1)
    m = open_clip_tiny if spec == "open_clip" else create_model({"backend": "hf", "config": _hf_config("clip")}).eval()
    save_checkpoint(m, tmp_path)
    back = load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(back.encode_image(x).embed, m.encode_image(x).embed)


def test_offline_missing_weights_fail_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match=r"open_clip:ViT-B-32:/path/to/weights"):
        create_model("open_clip:ViT-B-32:openai")
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-base-patch32/config.json"):
        create_model("hf:openai/clip-vit-base-patch32")
    assert time.time() - t0 < 60 # imports included; a hub retry loop would take minutes
    with pytest.raises(KeyError, match="no pretrained tag 'nonesuch'"): create_model("open_clip:ViT-B-32:nonesuch")
    with pytest.raises(KeyError, match="unknown backend 'timm'"): create_model("timm:vit")


def test_objectives_train_every_backend(open_clip_tiny):
    "One optimiser step of clip + filip through each backend's tokens moves the loss."
    from vlwb.core import PairBatch, TextKind
    from vlwb.losses import Objectives
    for m in (open_clip_tiny, create_model({"backend": "hf", "config": _hf_config("siglip")})):
        m.train()
        obj = Objectives({"clip": 1.0, "filip": 1.0})
        ids = torch.randint(1, 900, (4, 16))
        mask = torch.ones(4, 16, dtype=torch.bool)
        b = PairBatch(images=torch.randn(4, 3, 32, 32), text_ids=ids, text_mask=mask, text_image=torch.arange(4),
                      text_kind=torch.full((4,), int(TextKind.caption)))
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        losses = []
        for _ in range(2):
            out = obj(m.encode_image(b.images), m.encode_text(b.text_ids, b.text_mask), b, m.scale)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
        assert losses[1] < losses[0]
