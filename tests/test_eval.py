"""Evaluation metrics on hand-built numbers, against CLIP_benchmark's own metric functions, and the probes on stub
models."""
import json
import math
import re
import random

import pytest
import torch
import torch.nn.functional as F

from vlwb.core import ImageEnc, TextEnc, l2norm
from vlwb.eval import (zeroshot_metrics, retrieval_metrics, winoground_scores, order_perturbations, embedding_geometry,
                       pointing_game, compositional_probes, patch_hits, evaluate, EvalCallback)
from vlwb.models import VLModel
from vlwb.text import Tokenizer
from vlwb.images import Preprocess


def test_zeroshot_metrics_agree_with_the_reference_implementations():
    "CLIP_benchmark takes mean per-class recall from scikit-learn's balanced accuracy; its own top-k helper fails under"
    " numpy 2 (float() of a 1-element array), so top-k is checked against scikit-learn's top_k_accuracy_score."
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 10, generator=g), torch.randint(0, 10, (500,), generator=g)
    labels[:200] = 3 # unbalanced: mean per-class recall differs from top-1
    ours = zeroshot_metrics(logits, labels)
    acc1 = top_k_accuracy_score(labels.numpy(), logits.numpy(), k=1, labels=list(range(10)))
    acc5 = top_k_accuracy_score(labels.numpy(), logits.numpy(), k=5, labels=list(range(10)))
    assert math.isclose(ours["acc1"], acc1, abs_tol=1e-6) and math.isclose(ours["acc5"], acc5, abs_tol=1e-6)
    assert math.isclose(ours["mean_per_class_recall"],
                        balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy()), abs_tol=1e-6)


def test_retrieval_metrics_agree_with_clip_benchmark():
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k
    g = torch.Generator().manual_seed(1)
    img, txt = (F.normalize(torch.randn(40, 16, generator=g), dim=-1),
                F.normalize(torch.randn(120, 16, generator=g), dim=-1))
    text_image = torch.arange(40).repeat_interleave(3) # three captions per image
    txt = F.normalize(txt + 0.8 * img[text_image], dim=-1) # related, imperfectly
    ours = retrieval_metrics(img, txt, text_image)
    scores = txt @ img.T # CLIP_benchmark: texts x images
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(120), text_image] = True
    for k in (1, 5, 10):
        ref_t2i = (recall_at_k(scores, positive, k) > 0).float().mean().item()
        ref_i2t = (recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
        assert math.isclose(ours[f"image_retrieval_recall@{k}"], ref_t2i, abs_tol=1e-6)
        assert math.isclose(ours[f"text_retrieval_recall@{k}"], ref_i2t, abs_tol=1e-6)
    assert 0 < ours["text_retrieval_recall@1"] < ours["text_retrieval_recall@10"] <= 1


def test_winoground_and_geometry_by_hand():
    s = torch.tensor([[[1., 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [1, 0]], [[1, 0], [0.5, 0.9]]])
    assert winoground_scores(s) == {"winoground_text": 0.5, "winoground_image": 0.5, "winoground_group": 0.5}
    x = F.normalize(torch.tensor([[1., 0], [0, 1]]), dim=-1)
    g = embedding_geometry(x, x.roll(1, 0))
    assert math.isclose(g["alignment"], 2.0, rel_tol=1e-6) and math.isclose(g["modality_gap"], 0.0, abs_tol=1e-6)


def test_order_perturbations_keep_the_words():
    cap = "a small red circle at the top left and a large blue square on the right"
    ps = order_perturbations(cap, random.Random(3))
    assert len(ps) == 4 and len(set(ps)) == 4 and cap not in ps
    for p in ps: assert sorted(p.split()) == sorted(cap.split())
    # ARO's first perturbation shuffles nouns among nouns, then adjectives among adjectives: each keeps its slots
    nouns, adjs = {"circle", "top", "left", "square", "right"}, {"small", "red", "large", "blue"}
    for seed in range(20):
        first = order_perturbations(cap, random.Random(seed))[0].split()
        for w, orig in zip(first, cap.split()):
            assert (w in nouns) == (orig in nouns) and (w in adjs) == (orig in adjs), (first, cap)


class Oracle(VLModel):
    "A stub model on the shapes world: each patch token is the one-hot of the object label under it, each word of a"
    " description the one-hot of the object it names in the current image (or, with `blind`, of patch 0)."
    backend = "stub"
    def __init__(self, blind=False):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
        self.tokenizer, self.preprocess, self.blind, self.current = Tokenizer(16), Preprocess(64), blind, None
    def encode_image(self, images, attn=False):
        B = len(images)
        tokens = torch.zeros(B, 64, 8)
        if self.current is not None:
            over = patch_hits(self.current, (8, 8)).float() # [K, 64]
            tokens[:, :, :len(over)] = over.T[None]
        tokens[:, :, 7] = 0.01 # so no patch token is all zero
        return ImageEnc(embed=l2norm(torch.ones(B, 8)), tokens=l2norm(tokens), grid=(8, 8))
    def encode_text(self, texts, mask=None, attn=False):
        ids, mask = self._ids(texts, mask)
        tokens = torch.zeros(len(ids), ids.shape[1], 8)
        for t, text in enumerate(texts):
            k = self.names.index(tuple(text.split()[1:])) if not self.blind else 0
            tokens[t, :, 7 if self.blind else k] = 1
        return TextEnc(embed=l2norm(tokens[:, 0] + 0.01), tokens=tokens, mask=mask)


def test_pointing_game_scores_an_oracle_perfectly_and_a_blind_model_like_its_baseline(world, monkeypatch):
    """The game itself is checked: a model whose words point at their objects hits every time; one pointing nowhere
    does not."""
    from vlwb.records import ImageCaptionDataset
    orig = ImageCaptionDataset.__getitem__
    oracle, blind = Oracle(), Oracle(blind=True)
    def getitem(self, i):
        item = orig(self, i)
        for m in (oracle, blind):
            m.current = item["masks"]
            m.names = [(o["color"], o["shape"]) for o in self.records[i]["objects"]]
        return item
    monkeypatch.setattr(ImageCaptionDataset, "__getitem__", getitem)
    good = pointing_game(oracle, world["test"], progress=False)
    assert good["pointing_filip_color"] == good["pointing_filip_shape"] == good["pointing_dense"] == 1.0
    bad = pointing_game(blind, world["test"], progress=False)
    assert bad["pointing_filip_mean"] < 0.5 and 0 < bad["pointing_random"] < 0.5
    assert good["pointing_n"] == bad["pointing_n"] > 10


class BagOfWords(VLModel):
    """A text encoder that sees only which words occur (no order, no binding), and an image encoder that sees nothing.
    Its score is a number of the bag of words alone, carried exactly (the image is the first axis, the text's first
    coordinate that number), so equal bags tie exactly, whatever rows the matrix product puts them in."""
    backend = "stub"
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
        self.tokenizer, self.preprocess = Tokenizer(32), Preprocess(64)
    def encode_image(self, images, attn=False):
        e = torch.zeros(len(images), 8)
        e[:, 0] = 1
        return ImageEnc(embed=e, tokens=torch.zeros(len(images), 64, 8), grid=(8, 8))
    def encode_text(self, texts, mask=None, attn=False):
        ids, mask = self._ids(texts, mask)
        e = torch.zeros(len(ids), 8)
        for t, text in enumerate(texts):
            bag = sorted("a" if w == "an" else w for w in re.findall(r"[a-z]+", text.lower()))
            v = (sum((k + 1) * sum(map(ord, w)) for k, w in enumerate(bag)) % 997) / 997
            e[t, 0], e[t, 1] = v, math.sqrt(1 - v * v)
        return TextEnc(embed=e, tokens=torch.zeros(len(ids), ids.shape[1], 8), mask=mask)


def test_compositional_probes_catch_a_bag_of_words(world):
    """Swaps keep the words, so a bag-of-words model ties on them. ARO's rules: a tie counts against the true caption in
    VG-Relation and VG-Attribution (0 on every swap probe) and for the original in the order probe (1)."""
    m = compositional_probes(BagOfWords(), world["test"], progress=False)
    assert m["sugarcrepe_swap_attribute"] == m["sugarcrepe_swap_relation"] == m["aro_relation_macro"] == 0.0
    assert m["aro_attribution"] == 0.0
    assert m["aro_order"] == 1.0
    assert {"sugarcrepe_replace_object", "sugarcrepe_replace_attribute"} <= set(m)


def test_eval_callback_logs_during_training(tmp_path, world):
    import pandas as pd
    from vlwb.data import PairDataModule
    from vlwb.train import VLModule, make_trainer
    calls = []
    class Counting(EvalCallback):
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step % self.every == 0: calls.append(trainer.global_step)
            super().on_train_batch_end(trainer, *a)
    cb = Counting(world["test"], every_n_steps=2, tasks=("zeroshot", "retrieval"))
    trainer = make_trainer(tmp_path / "run", max_steps=4, progress=False, callbacks=[cb])
    trainer.fit(VLModule("builtin:micro", warmup_steps=1), PairDataModule(str(world["train"]), batch_size=16))
    assert calls == [2, 4]
    log = pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert log["eval/text_retrieval_recall@1"].notna().any() and log["eval/zeroshot_shape_acc1"].between(0, 1).any()


def test_vlwb_eval_writes_clip_benchmark_json(tmp_path, world):
    import shutil, subprocess, os
    from vlwb.core import save_checkpoint
    from vlwb.models import create_model
    save_checkpoint(create_model("builtin:micro"), tmp_path / "m")
    r = subprocess.run([shutil.which("vlwb"), "eval", "--model", str(tmp_path / "m"), "--data", str(world["test"]),
                        "--tasks", "retrieval,winoground,geometry", "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == {"dataset", "model", "task", "metrics"}
    assert {"image_retrieval_recall@5", "winoground_group", "modality_gap"} <= set(res["metrics"])
    with pytest.raises(KeyError, match="unknown evaluation tasks"):
        evaluate(create_model("builtin:micro"), world["test"], ["nope"])
