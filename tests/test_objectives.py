"The objective registry and CLIP's symmetric InfoNCE, checked against open_clip."
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from vlwb.core import PairBatch, ImageEnc, TextEnc, TextKind
from vlwb.losses import Objectives, clip_loss, OBJECTIVES


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
    out = Objectives({"clip": 2.0})(ImageEnc(u, u[:, None], (1, 1)), TextEnc(text_embed, text_embed[:, None], torch.ones(T, 1, dtype=torch.bool)),
                                    batch, torch.tensor(10.0))
    assert torch.allclose(out["clip"], clip_loss(u, caps, 10.0))
    assert torch.allclose(out["loss"], 2 * out["clip"])


def test_unknown_objective_names_the_known_ones():
    with pytest.raises(KeyError) as e: Objectives({"clip": 1.0, "filipp": 1.0})
    assert "filipp" in str(e.value) and "clip" in str(e.value)
    assert "clip" in OBJECTIVES


def test_no_objectives_is_an_error():
    with pytest.raises(ValueError, match="no objectives"): Objectives({})
