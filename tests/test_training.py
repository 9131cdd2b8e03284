"Real training runs of the builtin model: overfitting, determinism, and failing early on bad data."
import pandas as pd
import pytest
import torch

from vlwb.core import seed_everything
from vlwb.data import PairDataModule
from vlwb.shapes import generate_shapes_world
from vlwb.train import VLModule, make_trainer, in_batch_accuracy, no_decay


def _fit(train_path, out, steps, model="builtin:tiny", lr=1e-3, batch_size=8, seed=0):
    seed_everything(seed)
    dm = PairDataModule(str(train_path), batch_size=batch_size, seed=seed)
    module = VLModule(model, lr=lr, warmup_steps=5, weight_decay=0.0)
    make_trainer(out, max_steps=steps, progress=False).fit(module, dm)
    return module, dm, pd.read_csv(out / "logs" / "metrics.csv")


def test_overfits_eight_pairs(tmp_path):
    paths = generate_shapes_world(tmp_path / "w", n_train=8, n_val=0, n_test=0, seed=0, progress=False)
    module, dm, log = _fit(paths["train"], tmp_path / "run", steps=80)
    batch = next(iter(dm.train_dataloader()))
    module.eval()
    with torch.no_grad(): img, txt = module(batch)
    assert in_batch_accuracy(img.embed, txt.embed) == (1.0, 1.0)
    assert log["train/loss"].iloc[-1] < 0.2 * log["train/loss"].iloc[0]
    assert {"train/clip", "train/logit_scale", "train/i2t_acc", "train/t2i_acc"} <= set(log.columns)


def test_same_seed_same_first_losses(tmp_path, world):
    logs = [_fit(world["train"], tmp_path / f"run{i}", steps=3, model="builtin:micro", batch_size=16)[2]
            for i in range(2)]
    other = _fit(world["train"], tmp_path / "run_other", steps=3, model="builtin:micro", batch_size=16, seed=1)[2]
    a, b = (l["train/loss"].dropna().tolist() for l in logs)
    assert len(a) == 3 and a == b
    assert other["train/loss"].dropna().tolist() != a


def test_weight_decay_spares_norms_biases_and_the_logit_scale():
    module = VLModule("builtin:micro")
    decayed = {n for n, p in module.named_parameters() if not no_decay(n, p)}
    assert "model.logit_scale" not in decayed and not any("norm" in n or n.endswith(".bias") for n in decayed)
    assert "model.image_proj.weight" in decayed and "model.visual.blocks.0.attn.qkv.weight" in decayed


def test_logit_scale_is_clipped_at_100(tmp_path, world):
    seed_everything(0)
    module = VLModule("builtin:micro", lr=1e-3)
    with torch.no_grad(): module.model.logit_scale.fill_(10.0)
    assert module.model.scale.item() == pytest.approx(100.0)
    make_trainer(tmp_path, max_steps=1, progress=False).fit(module, PairDataModule(str(world["train"]), batch_size=16))
    assert module.model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_empty_dataset_fails_before_training(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    module = VLModule("builtin:micro")
    trainer = make_trainer(tmp_path / "run", max_steps=5, progress=False)
    with pytest.raises(ValueError, match="empty.jsonl has no records"):
        trainer.fit(module, PairDataModule(str(tmp_path / "empty.jsonl")))
    assert trainer.global_step == 0 and not (tmp_path / "run" / "checkpoint").exists()


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16"): make_trainer(tmp_path, precision="16-mixed")
