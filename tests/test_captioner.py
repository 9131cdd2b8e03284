"""Captioning from frozen encoders (`vlwb.lm`, `vlwb.captioner`) against references written from the official code:
LiMBeR's labels (`utils.py`, `build_labels`: -100 on the prefix and after the first end token, shifted inside the
model), SITTA's fit (`train_external_dataset.py`: scikit-learn's `LinearRegression(fit_intercept=False)` on one row per
image and word; `utils.py`, `orthogonal_procrustes`), CLOSE's noise on the text path in training only; and decoding,
saving, and the shapes-world scoring."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlwb.captioner import (Captioner, SittaMap, caption_metrics, close_captioner, fit_map, limber,
                            parse_shapes_caption, scene_scores, standardize, word_bags)
from vlwb.lm import CaptionLM, HFCausalLM, generate, lm_loss, load_lm, save_lm, start_ids

CAPTIONS = ["a large red circle at the top left", "a small blue square in the center and a green cross",
            "a purple triangle on the right", "an orange diamond at the bottom and a red circle",
            "a small yellow cross", "a large green square at the top right"]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return CaptionLM.for_texts(CAPTIONS, width=16, layers=1, heads=2, max_len=32).eval()


def limber_reference(lm, prefix, ids, mask):
    "LiMBeR's loss as its code builds it: labels [-100]*k + caption, -100 after the first end token, shift, mean CE."
    k = prefix.shape[1]
    labels = ids.clone()
    for row in labels:
        first_eos = (row == lm.eos_id).nonzero()[0, 0]
        row[first_eos + 1:] = -100
    labels[:, 0] = -100 # vlwb's start token sits between prefix and caption; it is read, not predicted
    labels = torch.cat([torch.full((len(ids), k), -100), labels], 1)
    logits = lm.logits(torch.cat([prefix, lm.embed(ids)], 1))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_lm_loss_equals_limber_labels(lm):
    ids, mask = lm.encode(CAPTIONS[:4])
    prefix = torch.randn(4, 3, 16)
    assert torch.allclose(lm_loss(lm, ids, mask, prefix), limber_reference(lm, prefix, ids, mask), atol=1e-6)
    # what follows the end token does not matter; the prefix does
    assert torch.allclose(lm_loss(lm, ids.masked_fill(~mask, 5), mask, prefix), lm_loss(lm, ids, mask, prefix))
    assert not torch.allclose(lm_loss(lm, ids, mask, prefix), lm_loss(lm, ids, mask, prefix + torch.randn(4, 3, 16)))


def test_greedy_is_the_argmax_path(lm):
    start = start_ids(lm, 1, "a")
    text, score = generate(lm, start, max_new=6, return_scores=True)
    seq, total = start, 0.0
    for _ in range(6):
        logp = lm.logits(lm.embed(seq))[0, -1].log_softmax(-1)
        logp[sorted(lm.special_ids - {lm.eos_id})] = float("-inf")
        nxt = int(logp.argmax())
        total += float(logp[nxt])
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        if nxt == lm.eos_id: break
    assert text[0] == lm.decode(seq[0, 2:].tolist())
    assert abs(score.item() - total) < 1e-4


def test_limber_trains_only_the_map(lm):
    feats = torch.randn(len(CAPTIONS), 12)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    cap = limber(lm, feats, [[c] for c in CAPTIONS], k=2, steps=40, warmup=5, progress=False)
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())
    assert sum(cap.log[-5:]) < sum(cap.log[:5])
    assert cap.map(feats).shape == (len(CAPTIONS), 2, 16)
    assert all(isinstance(c, str) for c in cap.caption(feats[:2], beam=3))
    with pytest.raises(ValueError, match="known: constant, linear"):
        limber(lm, feats, [[c] for c in CAPTIONS], steps=1, decay="cosine", progress=False)
    with pytest.raises(ValueError, match="6 feature rows but 5"):
        limber(lm, feats, [[c] for c in CAPTIONS[:5]], steps=1, progress=False)


def test_close_noise_on_text_in_training_only(lm):
    import copy
    t = torch.randn(len(CAPTIONS), 12)
    cap = close_captioner(copy.deepcopy(lm), t, CAPTIONS, sigma=0.2, steps=3, progress=False)
    with torch.no_grad():
        assert torch.equal(cap.prefix(t), cap.map(F.normalize(t, dim=-1))) # eval: normalised only
        cap.train()
        assert not torch.allclose(cap.prefix(t), cap.map(F.normalize(t, dim=-1)))
    assert cap.noise.sigma == 0.2 and isinstance(cap, Captioner)


def test_sitta_fit_equals_sklearn_on_repeated_rows(lm):
    from sklearn.linear_model import LinearRegression
    caps = [[c] for c in CAPTIONS] * 4
    feats = torch.randn(len(caps), 5, generator=torch.Generator().manual_seed(1))
    s = SittaMap(lm, feats, caps)
    x, _ = standardize(feats)
    bags = word_bags(lm, caps)
    rows = [i for i, b in enumerate(bags) for _ in b]
    y = s.table[[t for b in bags for t in b]]
    ref = LinearRegression(fit_intercept=False).fit(x[rows].double().numpy(), y.double().numpy()).coef_.T
    assert np.allclose(s.W.numpy(), ref, atol=1e-4)
    u, _, vt = np.linalg.svd(x[rows].double().numpy().T @ y.double().numpy(), full_matrices=False)
    assert np.allclose(SittaMap(lm, feats, caps, "procrustes").W.numpy(), u @ vt, atol=1e-5)


def test_procrustes_rows_orthonormal_and_lstsq_recovers():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 6, generator=g), torch.randn(6, 10, generator=g)
    assert torch.allclose(fit_map(x, x @ w), w, atol=1e-4)
    q = fit_map(x, torch.randn(200, 10, generator=g), "procrustes")
    assert torch.allclose(q @ q.T, torch.eye(6), atol=1e-5)


def test_sitta_bags_drop_stop_words_and_specials(lm):
    bag = word_bags(lm, [["a red circle, at the top.", "A red circle"]])[0]
    assert sorted(lm.decode([t]) for t in bag) == ["circle", "red", "top"]


def test_scene_scores_and_parse():
    objs = [{"shape": "circle", "color": "red", "size": "large", "position": "top left", "center": [10, 10]},
            {"shape": "square", "color": "blue", "size": "small", "position": "center", "center": [32, 32]}]
    parsed, rels = parse_shapes_caption("a large red circle at the top left to the left of a blue square")
    assert parsed[0] == {"size": "large", "color": "red", "shape": "circle", "position": "top left"}
    assert rels == [(0, "to the left of", 1)]
    good = scene_scores(["a large red circle at the top left to the left of a blue square"], [objs])
    assert good["precision"] == good["recall"] == good["relation_acc"] == 1.0
    bad = scene_scores(["a blue circle and a green cross"], [objs])
    assert bad["precision"] == 0.0 and bad["shape_acc"] == 0.5 and bad["color_acc"] == 0.5


def test_caption_metrics_identity_and_order():
    refs = [[c, c.replace("a ", "one ", 1)] for c in CAPTIONS]
    same = caption_metrics([c for c in CAPTIONS], refs)
    assert abs(same["BLEU-4"] - 1.0) < 1e-6 and same["CIDEr"] > caption_metrics(["a circle"] * 6, refs)["CIDEr"]


def test_hf_causal_lm_from_a_folder(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from vlwb.towers import minilm_path
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    hf = HFCausalLM(tmp_path / "gpt").eval()
    ids, mask = hf.encode(["a red circle"])
    assert hf.decode(ids[0, 1:].tolist()) == "a red circle"
    again = load_lm(save_lm(hf, tmp_path / "saved"))
    with torch.no_grad(): assert torch.equal(again.logits(again.embed(ids)), hf.logits(hf.embed(ids)))
    assert len(generate(hf, start_ids(hf, 2, "a"), torch.randn(2, 2, 16), beam=2, max_new=3)) == 2


def test_caption_lm_rejects_too_long_and_missing_folder(lm, tmp_path):
    with pytest.raises(ValueError, match="at most 32"): lm.logits(torch.zeros(1, 33, 16))
    with pytest.raises(FileNotFoundError, match="lm.json"): load_lm(tmp_path)
