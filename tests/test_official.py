"""The rebuilt objectives against references written from the official code's equations, in the official code's own
layouts: DreamLIP (`open_clip/loss.py`, `ClipLoss.forward` text-slot branch, `pairwise_circleloss`,
`pairwise_contrastive_loss`) and TCL (`models/model_pretrain.py`, `ALBEF.forward`, `in_batch_g2l_loss`); values and
gradients to 1e-5. Also: duplicate texts change only their own terms, the EMA update and the queue's FIFO order are
exact."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlwb.core import ImageEnc, TextEnc, TextKind
from vlwb.contrast import Contrast
from vlwb.losses import MultiPositiveObjective, GroupingObjective, TclObjective, ClipObjective, FeatureQueue


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, retain_graph=True)


# ---- DreamLIP ------------------------------------------------------------------------------------------------------
def dreamlip_reference(V, Tx, P, s, s_loc, gamma=32.0, margin=0.25, delta=-1.0):
    """DreamLIP's loss terms in its own layout: V `[N,D]` images, Tx `[N,T,D]` text slots (slot 0 the caption),
    P `[N,M,D]` patch tokens, s and s_loc the global and local logit scales. Returns (clip + declip, circle / 10,
    grouping)."""
    N, T, D = Tx.shape
    X = Tx.transpose(0, 1).reshape(T * N, D) # slot-major, as the official code stacks its per-slot lists
    lab = torch.arange(N)
    nce = 0
    for i in range(T): # CLIP_loss on slot 0 and (De)CLIP_loss on the others, each over 2T
        Xi = X[i * N:(i + 1) * N]
        nce = nce + (F.cross_entropy(s * V @ Xi.T, lab) + F.cross_entropy(s * Xi @ V.T, lab)) / (2 * T)
    S = V @ X.T # raw cosines, no scale
    pos = (torch.eye(N).repeat(T, 1).T).bool() # [N, T*N]
    a_p = torch.clamp_min(1 + margin - S.detach(), 0)
    a_n = torch.clamp_min(S.detach() + margin, 0)
    logit_p = -gamma * a_p * (S - (1 - margin)) - 1e8 * (~pos).float() # the official code masks by -1e8 shifts
    logit_n = gamma * a_n * (S - margin) - 1e8 * pos.float()
    circle = F.softplus(torch.logsumexp(logit_p, 1) + torch.logsumexp(logit_n, 1)).mean() / 10
    Pn, A = F.normalize(P, dim=-1), F.normalize(Tx, dim=-1)
    sim = torch.einsum("btd,bpd->btp", A, Pn)
    lo, hi = sim.min(-1, keepdim=True).values, sim.max(-1, keepdim=True).values
    w = (sim - lo) / (hi - lo + 1e-10)
    thr = 1 / P.shape[1] if delta < 0 else delta
    w = torch.where(w < thr, torch.zeros_like(w), w)
    a = w / w.sum(-1, keepdim=True)
    G = F.normalize(torch.einsum("btp,bpd->btd", a, Pn), dim=-1)
    Ft, Fg = A.reshape(N * T, D), G.reshape(N * T, D)
    l2 = torch.arange(N * T)
    grouping = 0.5 * (F.cross_entropy(s_loc * Ft @ Fg.T, l2) + F.cross_entropy(s_loc * Fg @ Ft.T, l2))
    return nce, circle, grouping


def _dreamlip_batch(N=5, K=3, M=6, D=16, seed=0):
    """vlwb's layout, as PairCollate makes it: every caption first, then each image's K sub-captions. The leaves are raw
    features normalised in the graph, as a model's towers do, so gradients compare through the same normalisation."""
    raw = [torch.randn(*s, generator=torch.Generator().manual_seed(seed + k)).requires_grad_()
           for k, s in enumerate([(N, D), (N, K + 1, D), (N, M, D)])]
    V, Tx, P = (F.normalize(x, dim=-1) for x in raw)
    texts = torch.cat([Tx[:, 0], Tx[:, 1:].reshape(N * K, D)])
    ti = torch.cat([torch.arange(N), torch.arange(N).repeat_interleave(K)])
    kind = torch.tensor([TextKind.caption] * N + [TextKind.subcaption] * (N * K))
    c = Contrast(ImageEnc(V, P, (2, 3)), TextEnc(texts, texts[:, None], torch.ones(len(texts), 1, dtype=torch.bool)),
                 ti, kind, slice(0, N), slice(0, len(texts)))
    return c, V, Tx, P, raw


@pytest.mark.parametrize("seed", [0, 1])
def test_multipos_equals_dreamlip(seed):
    c, V, Tx, P, raw = _dreamlip_batch(seed=seed)
    s = torch.tensor(9.0, requires_grad=True)
    out = MultiPositiveObjective()(c, s)
    nce, circle, _ = dreamlip_reference(V, Tx, P, s, 1.0)
    assert torch.allclose(out["multipos"], nce, atol=1e-5) and torch.allclose(out["multipos_circle"], circle, atol=1e-5)
    for a, b in zip(_grads(out["multipos"] + out["multipos_circle"], *raw[:2], s), _grads(nce + circle, *raw[:2], s)):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("threshold,delta", [(None, -1.0), (0.0, 0.0), (0.3, 0.3)])
def test_grouping_equals_dreamlip(threshold, delta):
    c, V, Tx, P, raw = _dreamlip_batch(seed=3)
    obj = GroupingObjective(threshold=threshold)
    with torch.no_grad(): obj.logit_scale.fill_(math.log(12.0))
    out = obj(c, torch.tensor(9.0))["grouping"]
    s_loc = obj.logit_scale.exp()
    _, _, ref = dreamlip_reference(V, Tx, P, 9.0, s_loc, delta=delta)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(_grads(out, *raw, obj.logit_scale), _grads(ref, *raw, obj.logit_scale)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_grouping_local_scale_is_its_own_and_clamped():
    obj = GroupingObjective()
    assert math.isclose(obj.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad(): obj.logit_scale.fill_(9.0)
    obj.after_step()
    assert math.isclose(obj.logit_scale.item(), math.log(100), rel_tol=1e-6)


# ---- TCL -----------------------------------------------------------------------------------------------------------
def g2l_reference(l, m, temp, mask=None):
    "TCL's in_batch_g2l_loss as written there: logits [N, P, 1 + N*P], exclusions by +-1e4 shifts."
    N, P, D = l.shape
    u_p = torch.einsum("npd,nd->np", l, m)[..., None] / temp # [N,P,1]
    if mask is not None: u_p = torch.where(mask[..., None], u_p, torch.full_like(u_p, 1e4))
    u_n = (m @ l.reshape(-1, D).T).reshape(N, N, P) / temp
    self_block = torch.eye(N, dtype=torch.bool)[:, :, None].expand(N, N, P)
    u_n = torch.where(self_block, torch.full_like(u_n, -1e4), u_n)
    if mask is not None: u_n = torch.where(mask[None].expand(N, N, P), u_n, torch.full_like(u_n, -1e4))
    u_n = u_n.reshape(N, 1, N * P).expand(N, P, N * P)
    logp = torch.cat([u_p, u_n], 2).log_softmax(2)[..., 0]
    if mask is None: return -logp.mean()
    return ((-logp * mask).sum(1) / mask.sum(1)).mean()


def tcl_reference(v, t, vm, tm, iq, tq, img_loc, txt_loc, txt_mask, temp, alpha):
    """TCL's six contrastive terms averaged, as `ALBEF.forward` computes them (queues `[K,D]`, locals of the momentum
    model)."""
    i_all, t_all = torch.cat([vm, iq]).T, torch.cat([tm, tq]).T
    N = len(v)
    y = torch.zeros(N, N + len(iq))
    y.fill_diagonal_(1)
    with torch.no_grad():
        q_i2t = alpha * F.softmax(vm @ t_all / temp, 1) + (1 - alpha) * y
        q_t2i = alpha * F.softmax(tm @ i_all / temp, 1) + (1 - alpha) * y
    i2t = -(F.log_softmax(v @ t_all / temp, 1) * q_i2t).sum(1).mean()
    t2i = -(F.log_softmax(t @ i_all / temp, 1) * q_t2i).sum(1).mean()
    i2i = -(F.log_softmax(v @ i_all / temp, 1) * y).sum(1).mean()
    t2t = -(F.log_softmax(t @ t_all / temp, 1) * y).sum(1).mean()
    lmi_t = g2l_reference(txt_loc, t, temp, txt_mask)
    lmi_i = g2l_reference(img_loc, v, temp)
    return (lmi_t + lmi_i + i2t + t2i + i2i + t2t) / 6


@pytest.mark.parametrize("alpha,step", [(0.4, 10), (0.0, 0), (0.4, 2)])
def test_tcl_equals_tcl(alpha, step):
    N, L, D, K, gh = 6, 5, 16, 12, 8
    v, t = _unit(N, D, seed=1).requires_grad_(), _unit(N, D, seed=2).requires_grad_()
    vm, tm = _unit(N, D, seed=3), _unit(N, D, seed=4)
    patches_m, words_m = _unit(N, gh * gh, D, seed=5), _unit(N, L, D, seed=6)
    words = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0],
                          [0, 1, 1, 1, 0]]).bool()
    mask = torch.ones(N, L, dtype=torch.bool)
    kind = torch.zeros(N, dtype=torch.long)
    obj = TclObjective(embed_dim=D, queue_size=K, alpha=alpha, alpha_warmup=4)
    iq, tq = obj.image_queue.feats.clone(), obj.text_queue.feats.clone()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    c = Contrast(ImageEnc(v, _unit(N, gh * gh, D, seed=7), (gh, gh)), TextEnc(t, _unit(N, L, D, seed=8), mask),
                 torch.arange(N), kind, slice(0, N), slice(0, N),
                 img_m=ImageEnc(vm, patches_m, (gh, gh)), txt_m=TextEnc(tm, words_m, mask, words=words), step=step)
    out = obj(c, scale)
    total = out["tcl_ita"] + out["tcl_imc"] + out["tcl_lmi"]
    # TCL's patch_pooling
    img_loc = F.avg_pool2d(patches_m.reshape(N, gh, gh, D).permute(0, 3, 1, 2), gh // 4).flatten(2).transpose(1, 2)
    ramp = alpha * min(1.0, step / 4)
    ref = tcl_reference(v, t, vm, tm, iq, tq, img_loc, words_m, words, 1 / scale, ramp)
    assert torch.allclose(total, ref, atol=1e-5), (total, ref)
    for a, b in zip(_grads(total, v, t, scale), _grads(ref, v, t, scale)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    # the batch went into the queues after the losses, oldest first
    assert torch.equal(obj.image_queue.feats[:N], vm) and torch.equal(obj.image_queue.feats[N:], iq[N:])
    assert torch.equal(obj.text_queue.feats[:N], tm) and int(obj.text_queue.ptr) == N


def test_g2l_padding_contributes_nothing():
    l, m = _unit(3, 4, 8, seed=1), _unit(3, 8, seed=2)
    full = torch.ones(3, 4, dtype=torch.bool)
    from vlwb.losses import g2l_loss
    assert torch.allclose(g2l_loss(l, m, slice(0, 3), 10.0, full), g2l_reference(l, m, 0.1), atol=1e-6)
    part = full.clone()
    part[0, 2:] = False
    assert torch.allclose(g2l_loss(l, m, slice(0, 3), 10.0, part), g2l_reference(l, m, 0.1, part), atol=1e-6)


def test_queue_is_first_in_first_out():
    q = FeatureQueue(5, 2)
    first = q.feats.clone()
    x = F.normalize(torch.arange(1, 15, dtype=torch.float).reshape(7, 2), dim=-1)
    q.push(x[:3])
    assert torch.equal(q.feats[:3], x[:3]) and torch.equal(q.feats[3:], first[3:]) and int(q.ptr) == 3
    q.push(x[3:6]) # wraps: slots 3, 4, then 0
    assert torch.equal(q.feats[[3, 4, 0]], x[3:6]) and torch.equal(q.feats[1:3], x[1:3]) and int(q.ptr) == 1
    q.push(x) # more than fits: the newest 5, written from the pointer on
    assert torch.equal(q.feats[[1, 2, 3, 4, 0]], x[2:]) and int(q.ptr) == 1


def test_momentum_update_is_exact():
    from vlwb.train import VLModule
    m = VLModule("builtin:micro", objectives={"tcl": {"queue_size": 8}}, momentum=0.9)
    assert all(not p.requires_grad for p in m.momentum_model.parameters())
    # a copy to begin with
    assert all(torch.equal(a, b) for a, b in zip(m.momentum_model.parameters(), m.model.parameters()))
    before = [p.detach().clone() for p in m.momentum_model.parameters()]
    with torch.no_grad():
        for p in m.model.parameters(): p.add_(1.0)
    m.momentum_update()
    for pm, p, b in zip(m.momentum_model.parameters(), m.model.parameters(), before):
        assert torch.allclose(pm, 0.9 * b + 0.1 * p, atol=1e-7, rtol=0)


# ---- duplicate texts ------------------------------------------------------------------------------------------------
def test_duplicate_captions_change_only_their_own_terms():
    "Images 0 and 2 have identical captions: merged, each leaves the other's caption (and image) out of its softmax."
    N, D = 5, 8
    u, v = _unit(N, D, seed=1), _unit(N, D, seed=2)
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 7, 2], [1, 8, 2]])
    kind, ti = torch.zeros(N, dtype=torch.long), torch.arange(N)
    enc = TextEnc(v, v[:, None], torch.ones(N, 1, dtype=torch.bool))
    key = torch.unique(ids, dim=0, return_inverse=True)[1]
    plain = Contrast(ImageEnc(u, u[:, None], (1, 1)), enc, ti, kind, slice(0, N), slice(0, N))
    merged = Contrast(ImageEnc(u, u[:, None], (1, 1)), enc, ti, kind, slice(0, N), slice(0, N), text_key=key)
    s = 10.0
    logits = s * u @ v.T
    def ce_rows(lg): return -(lg.diag() - lg.logsumexp(1)) # per-row cross-entropy, target the diagonal
    ex = torch.zeros(N, N, dtype=torch.bool)
    ex[0, 2] = ex[2, 0] = True
    i2t_plain, i2t_merged = ce_rows(logits), ce_rows(logits.masked_fill(ex, float("-inf")))
    t2i_plain, t2i_merged = ce_rows(logits.T), ce_rows(logits.T.masked_fill(ex.T, float("-inf")))
    changed = (i2t_plain != i2t_merged) | (t2i_plain != t2i_merged)
    assert changed.tolist() == [True, False, True, False, False] # only the duplicates' terms move
    assert torch.allclose(ClipObjective()(plain, s)["clip"], (i2t_plain.mean() + t2i_plain.mean()) / 2, atol=1e-6)
    assert torch.allclose(ClipObjective()(merged, s)["clip"], (i2t_merged.mean() + t2i_merged.mean()) / 2, atol=1e-6)


def test_build_merges_identical_token_ids():
    from vlwb.core import PairBatch
    ids = torch.tensor([[1, 5, 2, 0], [1, 6, 2, 0], [1, 5, 2, 0], [1, 5, 2, 9]])
    mask = ids != 0
    mask[3, 3] = False # padding differs but is not read
    b = PairBatch(torch.zeros(4, 3, 4, 4), ids, mask, torch.arange(4), torch.zeros(4, dtype=torch.long))
    u = _unit(4, 8, seed=0)
    c = Contrast.build(ImageEnc(u, u[:, None], (1, 1)), TextEnc(u, u[:, None], mask[:, :1]), b, merge_duplicates=True)
    k = c.text_key.tolist()
    assert k[0] == k[2] == k[3] != k[1]
    fn = c.false_negatives(torch.arange(4), torch.arange(4))
    assert fn.tolist() == [[False, False, True, True], [False] * 4, [True, False, False, True],
                           [True, False, True, False]]


def test_tcl_ablations_drop_their_term():
    N, D = 4, 8
    v, t = _unit(N, D, seed=1), _unit(N, D, seed=2)
    mask = torch.ones(N, 3, dtype=torch.bool)
    c = Contrast(ImageEnc(v, _unit(N, 16, D, seed=3), (4, 4)), TextEnc(t, _unit(N, 3, D, seed=4), mask),
                 torch.arange(N), torch.zeros(N, dtype=torch.long), slice(0, N), slice(0, N),
                 img_m=ImageEnc(v, _unit(N, 16, D, seed=5), (4, 4)), txt_m=TextEnc(t, _unit(N, 3, D, seed=6), mask))
    def tcl(**kw):
        torch.manual_seed(0) # the same random queue to begin with
        return TclObjective(D, 8, **kw)(c, torch.tensor(10.))
    full = tcl()
    assert set(tcl(imc=False)) == {"tcl_ita", "tcl_lmi"}
    no_lmi = tcl(lmi=False)
    assert set(no_lmi) == {"tcl_ita", "tcl_imc"} and torch.allclose(no_lmi["tcl_ita"], full["tcl_ita"])


# ---- STRUCTURE -----------------------------------------------------------------------------------------------------
def structure_reference(original, aligned, levels, temperature, weighting, margin=0.0, eps=1e-12):
    """`structure_reg` as `mlbio-epfl/STRUCTURE` writes it (`src/loss/clip_loss.py`): safe_normalize, then centre;
    cosine / tau; row softmax; `torch.matrix_power` per level; `F.kl_div(log(P + eps), M + eps, "batchmean")` for
    both sides, halved; relu(js - margin); weight 1 or 1/l; divided by the number of levels."""
    def prep(x):
        norms = x.norm(dim=-1)
        if not torch.all((norms - 1).abs() < 1e-6): x = F.normalize(x, p=2, dim=-1, eps=1e-12)
        return x - x.mean(dim=0, keepdim=True)
    po = torch.softmax(prep(original) @ prep(original).T / temperature, dim=-1)
    pa = torch.softmax(prep(aligned) @ prep(aligned).T / temperature, dim=-1)
    total = 0.0
    for level in range(1, levels + 1):
        a, b = torch.matrix_power(po, level), torch.matrix_power(pa, level)
        m = (a + b) / 2
        js = 0.5 * (F.kl_div(torch.log(b + eps), m + eps, reduction="batchmean")
                    + F.kl_div(torch.log(a + eps), m + eps, reduction="batchmean"))
        js = F.relu(js - margin)
        total = total + js * (1.0 if weighting == "none" else 1.0 / level)
    return total / levels


@pytest.mark.parametrize("levels,weighting,margin", [(1, "none", 0.0), (3, "inverse", 0.0), (2, "none", 0.05),
                                                     (5, "inverse", 0.0)])
def test_structure_reg_matches_the_official_code(levels, weighting, margin):
    from vlwb.align import structure_reg
    g = torch.Generator().manual_seed(levels)
    frozen = torch.randn(48, 20, generator=g, dtype=torch.float64)
    aligned = (frozen[:, :8] + 0.5 * torch.randn(48, 8, generator=g, dtype=torch.float64)).requires_grad_()
    for tau in (0.05, 0.1, 0.5):
        ours = structure_reg(frozen, aligned, temperature=tau, levels=levels, weighting=weighting, margin=margin)
        ref = structure_reference(frozen, aligned, levels, tau, weighting, margin)
        assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-7), (tau, float(ours), float(ref))
        g_ours, g_ref = _grads(ours, aligned)[0], _grads(ref, aligned)[0]
        assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_mutual_knn_matches_the_official_code():
    """`AlignmentMetrics.mutual_knn` (`src/utils/metrics.py`): kNN from the argsort of the Gram matrix of
    row-normalised features with the diagonal at -1e8, 0/1 masks, the mean of |A ∩ B| / k."""
    from vlwb.align import mutual_knn, rice_k
    def reference(a, b, k):
        def knn(x):
            gram = x @ x.T
            gram.fill_diagonal_(-1e8)
            return gram.argsort(dim=1, descending=True)[:, :k]
        n = len(a)
        ma = torch.zeros(n, n).scatter_(1, knn(F.normalize(a, dim=-1)), 1.0)
        mb = torch.zeros(n, n).scatter_(1, knn(F.normalize(b, dim=-1)), 1.0)
        return ((ma * mb).sum(1) / k).mean().item()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    b = a[:, :6] @ torch.randn(6, 10, generator=g) + torch.randn(300, 10, generator=g)
    for k in (5, rice_k(300), 40):
        assert abs(mutual_knn(a, b, k) - reference(a, b, k)) < 1e-9
    assert rice_k(5000) == 35 and rice_k(1000) == 20
