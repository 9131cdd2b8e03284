"The objective registry and CLIP's symmetric InfoNCE, checked against open_clip."
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from vlwb.core import PairBatch, ImageEnc, TextEnc, TextKind
from vlwb.losses import Objectives, OBJECTIVES
from vlwb.pairloss import clip_loss


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("B,D,scale", [(2, 8, 1.0), (32, 64, 14.29), (257, 128, 100.0)])
def test_clip_equals_open_clip(B, D, scale):
    u, v = _unit(B, D, seed=B), _unit(B, D, seed=B + 1)
    ours = clip_loss(u, v, torch.tensor(scale))
    ref = ClipLoss()(u, v, torch.tensor(scale))
    assert torch.allclose(ours, ref, atol=1e-5), (ours.item(), ref.item())


def test_clip_gradients_equal_open_clip():
    u, v = _unit(16, 32, seed=0).requires_grad_(), _unit(16, 32, seed=1).requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    g_ours = torch.autograd.grad(clip_loss(u, v, s), (u, v, s))
    g_ref = torch.autograd.grad(ClipLoss()(u, v, s), (u, v, s))
    for a, b in zip(g_ours, g_ref): assert torch.allclose(a, b, atol=1e-6)


def test_clip_objective_uses_each_images_caption_and_ignores_other_texts():
    "Sub-captions and hard negatives in the batch leave `clip` unchanged: it contrasts each image with its caption."
    B, D = 4, 16
    u, caps, extra = _unit(B, D, seed=2), _unit(B, D, seed=3), _unit(3, D, seed=4)
    order = torch.tensor([2, 0, 3, 1])  # captions stored out of order, mixed with other kinds
    text_embed = torch.cat([extra[:2], caps[order], extra[2:]])
    text_image = torch.cat([torch.tensor([0, -1]), order, torch.tensor([-1])])
    kinds = torch.tensor([TextKind.subcaption, TextKind.negative] + [TextKind.caption] * B + [TextKind.negative])
    T = len(text_embed)
    batch = PairBatch(images=torch.zeros(B, 3, 4, 4), text_ids=torch.ones(T, 3, dtype=torch.long),
                      text_mask=torch.ones(T, 3, dtype=torch.bool), text_image=text_image, text_kind=kinds)
    out = Objectives({"clip": 2.0})(ImageEnc(u, u[:, None], (1, 1)),
                                    TextEnc(text_embed, text_embed[:, None], torch.ones(T, 1, dtype=torch.bool)),
                                    batch, torch.tensor(10.0))
    assert torch.allclose(out["clip"], clip_loss(u, caps, 10.0))
    assert torch.allclose(out["loss"], 2 * out["clip"])


def test_unknown_objective_names_the_known_ones():
    with pytest.raises(KeyError) as e: Objectives({"clip": 1.0, "filipp": 1.0})
    assert "filipp" in str(e.value) and "clip" in str(e.value)
    assert "clip" in OBJECTIVES


def test_no_objectives_is_an_error():
    with pytest.raises(ValueError, match="no objectives"): Objectives({})


# ---- the seed papers' objectives ---------------------------------------------------------------------------------

from open_clip.loss import SigLipLoss
from vlwb.contrast import Contrast
from vlwb.losses import (filip_similarity, filip_similarity_naive, SigLipObjective, MultiPositiveObjective,
                         GroupingObjective, HardNegativeObjective, FilipObjective)


def _contrast(img_embed, txt_embed, text_image, kinds, img_tokens=None, txt_tokens=None, txt_mask=None, img_m=None,
              txt_m=None):
    B, T = len(img_embed), len(txt_embed)
    it = img_tokens if img_tokens is not None else img_embed[:, None]
    tt = txt_tokens if txt_tokens is not None else txt_embed[:, None]
    tm = txt_mask if txt_mask is not None else torch.ones(tt.shape[:2], dtype=torch.bool)
    return Contrast(ImageEnc(img_embed, it, (1, it.shape[1])), TextEnc(txt_embed, tt, tm), torch.as_tensor(text_image),
                    torch.as_tensor(kinds), slice(0, B), slice(0, T), img_m, txt_m)


@pytest.mark.parametrize("B,D,scale,bias", [(2, 8, 10.0, -10.0), (64, 32, 3.0, 0.5), (200, 64, 30.0, -4.0)])
def test_siglip_equals_open_clip(B, D, scale, bias):
    u, v = _unit(B, D, seed=B).requires_grad_(), _unit(B, D, seed=B + 7).requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    obj = SigLipObjective(init_bias=bias)
    c = _contrast(u, v, torch.arange(B), torch.zeros(B, dtype=torch.long))
    ours = obj(c, s)["siglip"]
    ref = SigLipLoss()(u, v, s, obj.bias)
    assert torch.allclose(ours, ref, rtol=1e-5), (ours.item(), ref.item())
    # the bias learns as open_clip's does, and so do the features and the scale
    for g1, g2 in zip(torch.autograd.grad(ours, (obj.bias, u, v, s)), torch.autograd.grad(ref, (obj.bias, u, v, s))):
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7), (g1 - g2).abs().max()


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_filip_chunked_equals_naive_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(7, 9, 16, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(5, 6, 16, generator=g), dim=-1).requires_grad_()
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 4, 1, 5])[:, None]
    a = filip_similarity(x, y, mask, chunk=chunk)
    b = filip_similarity_naive(x, y, mask)
    for p, q in zip(a, b): assert torch.allclose(p, q, atol=1e-6)
    ga = torch.autograd.grad(a[0].sum() + 2 * a[1].sum(), (x, y))
    gb = torch.autograd.grad(b[0].sum() + 2 * b[1].sum(), (x, y))
    for p, q in zip(ga, gb): assert torch.allclose(p, q, atol=1e-6)
    assert (ga[1][~mask] == 0).all() # padding tokens get no gradient: they never count


def test_filip_definition_on_a_hand_made_pair():
    "One image of two patches, one text of two real tokens and one pad: s_I and s_T by hand."
    e = torch.eye(3)
    x = torch.stack([e[0], e[1]])[None] # patches: e0, e1
    y = torch.stack([e[0], F.normalize(e[0] + e[2], dim=0), e[1]])[None] # words: e0, (e0+e2)/sqrt2, pad=e1
    mask = torch.tensor([[True, True, False]])
    s_i, s_t = filip_similarity(x, y, mask)
    # patch e0: best word e0 -> 1; patch e1: best real word -> 0 (the pad e1 would give 1, but does not count)
    assert torch.allclose(s_i, torch.tensor([[0.5]]))
    # word e0: best patch 1; word (e0+e2)/sqrt2: best patch 1/sqrt2
    assert torch.allclose(s_t, torch.tensor([[(1 + 2 ** -0.5) / 2]]))


def test_filip_objective_prefers_the_matching_tokens():
    B, I, L, D = 4, 6, 5, 16
    xt = _unit(B, I, D, seed=1)
    aligned = _unit(B, D, seed=2)
    good = FilipObjective()(_contrast(aligned, aligned, torch.arange(B), torch.zeros(B, dtype=torch.long), xt,
                                      xt[:, :L]), torch.tensor(20.))
    bad = FilipObjective()(_contrast(aligned, aligned, torch.arange(B), torch.zeros(B, dtype=torch.long), xt,
                                     xt[torch.tensor([1, 2, 3, 0]), :L]), torch.tensor(20.))
    assert good["filip"] < 0.05 < bad["filip"]


def test_multipos_slots_follow_each_image_not_the_batch_order():
    "Texts in any order: each image's caption is slot 0 and its sub-captions follow in batch order; uneven counts fail."
    u, v = _unit(2, 8, seed=5), _unit(6, 8, seed=6)
    ti = torch.tensor([1, 0, 1, 0, 0, 1])
    kinds = torch.tensor([TextKind.subcaption, TextKind.subcaption, TextKind.caption, TextKind.subcaption,
                          TextKind.caption, TextKind.subcaption])
    assert _contrast(u, v, ti, kinds).slots().tolist() == [[4, 1, 3], [2, 0, 5]]
    with pytest.raises(ValueError, match="same number of texts per image"):
        _contrast(u, v[:5], ti[:5], kinds[:5]).slots()
    out = MultiPositiveObjective()(_contrast(u, v, ti, kinds), torch.tensor(5.))
    assert set(out) == {"multipos", "multipos_circle"} and all(torch.isfinite(x) for x in out.values())


def test_hardneg_adds_negatives_to_the_image_softmax_only():
    u, caps, negs = _unit(3, 8, seed=7), _unit(3, 8, seed=8), _unit(2, 8, seed=9)
    v = torch.cat([caps[:1], negs[:1], caps[1:], negs[1:]]) # negatives stored between captions
    c = _contrast(u, v, torch.tensor([0, -1, 1, 2, -1]), torch.tensor([0, TextKind.negative, 0, 0, TextKind.negative]))
    out = HardNegativeObjective()(c, torch.tensor(10.))["hardneg"]
    l_i2t = 10. * u @ torch.cat([caps, negs]).T # each image against every caption and every negative
    ref = (F.cross_entropy(l_i2t, torch.arange(3)) + F.cross_entropy(10. * caps @ u.T, torch.arange(3))) / 2
    assert torch.allclose(out, ref, atol=1e-6)
    # a negative identical to image 0's caption makes the loss higher than CLIP's
    v2 = torch.cat([caps, caps[:1]])
    c2 = _contrast(u, v2, torch.tensor([0, 1, 2, -1]), torch.tensor([0, 0, 0, TextKind.negative]))
    assert HardNegativeObjective()(c2, torch.tensor(10.))["hardneg"] > clip_loss(u, caps, 10.) + 0.05


def test_grouping_pools_the_patches_a_subcaption_describes():
    "A text equal to one patch pools (almost only) that patch, so the grouped embedding finds its text."
    xt = _unit(2, 4, 8, seed=9)
    # sub-caption of image 0 = its patch 2; of image 1 = its patch 3
    sub = xt[torch.tensor([0, 1]), torch.tensor([2, 3])]
    cap = xt[torch.tensor([0, 1]), torch.tensor([0, 1])] # and each caption one of its image's other patches
    g = GroupingObjective(threshold=0.99).group(sub, xt)
    assert torch.allclose(g, sub, atol=1e-6)
    c = _contrast(_unit(2, 8, seed=10), torch.cat([cap, sub]), torch.tensor([0, 1, 0, 1]),
                  torch.tensor([0, 0, TextKind.subcaption, TextKind.subcaption]), xt)
    obj = GroupingObjective(threshold=0.99)
    with torch.no_grad(): obj.logit_scale.fill_(math.log(100))
    assert obj(c, torch.tensor(1.))["grouping"] < 0.01


def test_objectives_that_need_texts_say_which():
    u, v = _unit(2, 8, seed=1), _unit(2, 8, seed=2)
    b = PairBatch(images=torch.zeros(2, 3, 4, 4), text_ids=torch.ones(2, 3, dtype=torch.long),
                  text_mask=torch.ones(2, 3, dtype=torch.bool), text_image=torch.arange(2),
                  text_kind=torch.zeros(2, dtype=torch.long))
    enc = (ImageEnc(u, u[:, None], (1, 1)), TextEnc(v, v[:, None], torch.ones(2, 1, dtype=torch.bool)))
    for name, what in (("multipos", "sub-captions"), ("grouping", "sub-captions"), ("hardneg", "hard negatives")):
        with pytest.raises(ValueError, match=f"objective '{name}' needs {what}"):
            Objectives({name: 1.0})(*enc, b, torch.tensor(5.))
    with pytest.raises(ValueError, match="objective 'tcl' needs the momentum model"):
        Objectives({"tcl": 1.0}, embed_dim=8)(*enc, b, torch.tensor(5.))
    with pytest.raises(ValueError, match=r"image \(2, 8\), text \(2, 4\)"):
        Objectives({"clip": 1.0})(enc[0], TextEnc(_unit(2, 4, seed=3), v[:, None], torch.ones(2, 1, dtype=torch.bool)),
                                  b, 5.)


def test_non_finite_loss_names_the_objective():
    u = _unit(2, 8, seed=1)
    b = PairBatch(images=torch.zeros(2, 3, 4, 4), text_ids=torch.ones(2, 3, dtype=torch.long),
                  text_mask=torch.ones(2, 3, dtype=torch.bool), text_image=torch.arange(2),
                  text_kind=torch.zeros(2, dtype=torch.long))
    nan = u.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="objective 'siglip'"):
        Objectives({"siglip": 1.0})(ImageEnc(nan, nan[:, None], (1, 1)),
                                    TextEnc(u, u[:, None], torch.ones(2, 1, dtype=torch.bool)), b, torch.tensor(5.))


def test_tcl_terms_reward_matching_views_and_own_tokens():
    from vlwb.losses import TclObjective
    B, I, L, D = 4, 16, 3, 16
    u, cap = _unit(B, D, seed=20), _unit(B, D, seed=21)
    def terms(img_m_embed, txt_m_embed, patches, words):
        c = _contrast(u, cap, torch.arange(B), torch.zeros(B, dtype=torch.long), img_tokens=patches, txt_tokens=words,
                      img_m=ImageEnc(img_m_embed, patches, (4, 4)),
                      txt_m=TextEnc(txt_m_embed, words, torch.ones(B, L, dtype=torch.bool)))
        obj = TclObjective(embed_dim=D, queue_size=4)
        with torch.no_grad():
            obj.image_queue.feats.copy_(-u)
            obj.text_queue.feats.copy_(-cap) # queues far from everything
        return obj(c, torch.tensor(20.))
    # views agree, tokens are their global
    same = terms(u, cap, u[:, None].expand(B, I, D), cap[:, None].expand(B, L, D))
    other = terms(u[torch.tensor([1, 2, 3, 0])], cap[torch.tensor([3, 0, 1, 2])], _unit(B, I, D, seed=23),
                  _unit(B, L, D, seed=24))
    for k in ("tcl_imc", "tcl_lmi"): assert same[k] < 0.01 < other[k], k # (tcl_ita: test_official)
