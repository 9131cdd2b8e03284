"""Two CPU processes under Lightning DDP (gloo) compute the loss and gradients of one process on the same global batch,
for every objective (TCL's momentum model and queues included) with duplicate captions merged across the ranks."""
import json

import torch
from safetensors.torch import save_file, load_file

import lightning as L
from vlwb.core import seed_everything
from vlwb.data import PairCollate
from vlwb.contrast import Contrast
from vlwb.text import Tokenizer
from vlwb.train import VLModule

OBJECTIVES = {"clip": 1.0, "siglip": 0.5, "filip": 1.0, "multipos": 1.0, "grouping": 0.5, "hardneg": 1.0,
              "tcl": {"weight": 1.0, "queue_size": 12}}
WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "cross"]


def _items(n=8):
    """Deterministic records: a caption (three repeat others', on the other rank), a two-sentence long caption, one hard
    negative."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        w = [WORDS[int(k)] for k in torch.randint(0, len(WORDS), (4,), generator=g)]
        caption = items[i - 5]["captions"][0] if i >= 5 else f"a {w[0]} {w[1]} thing {i}" # 5, 6, 7 repeat 0, 1, 2
        items.append({"image": torch.randn(3, 32, 32, generator=g), "captions": [caption],
                      "meta": {"long": f"A {w[2]} shape {i}. It is {w[3]}.",
                               "negatives": [{"text": f"a {w[1]} {w[0]} thing {i}", "kind": "swap_attribute"}]}})
    return items


def _collate():
    return PairCollate(Tokenizer(16), train=False, n_subcaptions=2, n_negatives=1)


class Probe(L.Callback):
    "Save each rank's loss and, after DDP has averaged them, rank 0's gradients."
    def __init__(self, out): self.out = out
    def on_after_backward(self, trainer, module):
        if trainer.is_global_zero:
            save_file({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None},
                      f"{self.out}/grads.safetensors")
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(f"{self.out}/loss{trainer.global_rank}.json", "w") as f:
            json.dump({"loss": float(outputs["loss"]), "n_images": batch.n_images}, f)
        tcl = module.objectives.terms["tcl"]
        save_file({"image_queue": tcl.image_queue.feats, "text_queue": tcl.text_queue.feats, "ptr": tcl.image_queue.ptr,
                   **{f"momentum.{n}": p for n, p in module.momentum_model.named_parameters()}},
                  f"{self.out}/state{trainer.global_rank}.safetensors")


class Data(L.LightningDataModule):
    "Rank r takes samples r, r+2, ... in order (a sampler of our own: Lightning's would shuffle the training data)."
    def train_dataloader(self):
        sampler = torch.utils.data.DistributedSampler(_items(), num_replicas=self.trainer.world_size,
                                                      rank=self.trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(_items(), batch_size=4, sampler=sampler, collate_fn=_collate())


def _module():
    seed_everything(0)
    return VLModule("builtin:micro", model_config={"image_size": 32, "context_length": 16}, objectives=OBJECTIVES,
                    lr=0.0, warmup_steps=1, weight_decay=0.0, merge_duplicates=True)


def test_ddp_two_processes_equal_one_process(tmp_path):
    module = _module()
    # one process, the global batch in the order DDP gathers it: rank 0's samples (0, 2, 4, 6) then rank 1's
    # (1, 3, 5, 7)
    items = _items()
    batch = _collate()([items[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)])
    ref = _module()
    _, _, losses = ref.losses(batch)
    assert Contrast.build(*ref(batch), batch, merge_duplicates=True).false_negatives(torch.arange(8),
                                                                                     torch.arange(8)).any()
    losses["loss"].backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Probe(tmp_path)], use_distributed_sampler=False)
    trainer.fit(module, Data())

    rank_losses = [json.loads((tmp_path / f"loss{r}.json").read_text()) for r in range(2)]
    assert [r["n_images"] for r in rank_losses] == [4, 4]
    # each rank's loss covers its rows of the global batch; DDP's average of the two is the one-process loss
    mean_loss = sum(r["loss"] for r in rank_losses) / 2
    assert abs(mean_loss - losses["loss"].item()) < 1e-5, (mean_loss, losses["loss"].item())
    grads = load_file(tmp_path / "grads.safetensors")
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, atol=1e-5, rtol=1e-4), (n, (grads[n] - g).abs().max().item())
    # both ranks hold the queues and momentum model one process holds after the step: the global batch, in rank order
    tcl = ref.objectives.terms["tcl"]
    for r in range(2):
        state = load_file(tmp_path / f"state{r}.safetensors")
        assert torch.allclose(state["image_queue"], tcl.image_queue.feats, atol=1e-5)
        assert torch.allclose(state["text_queue"], tcl.text_queue.feats, atol=1e-5) and int(state["ptr"]) == 8
        for n, p in ref.momentum_model.named_parameters():
            assert torch.allclose(state[f"momentum.{n}"], p, atol=1e-6), n
