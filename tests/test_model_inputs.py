"""The data follows the model: the ids and pixels reaching a model are what its own library's tokenizer and transforms
make."""
import gzip, json, os, shutil, subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from vlwb.images import skimage_path
from vlwb.data import PairDataModule
from vlwb.models import create_model
from vlwb.train import VLModule, VLCLI

from conftest import hf_config

PHOTOS = {"astronaut": "an astronaut in an orange suit", "coffee": "a white cup of coffee on a red saucer",
          "chelsea": "a close-up of a tabby cat"}  # square, landscape and portrait-ish: crops and squashes differ


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"image": f"skimage:{k}", "caption": c}) + "\n"
                                           for k, c in PHOTOS.items()))
    return d / "pairs.jsonl"


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    """A small transformers CLIP saved with its own CLIPTokenizer (vocabulary and merges from open_clip's bundled BPE)
    and image processor."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPImageProcessor, CLIPTokenizer
    d = tmp_path_factory.mktemp("hf-clip") / "clip"
    create_model({"backend": "hf", "config": hf_config("clip")}).net.save_pretrained(d)
    # the same two tokens, as transformers spells them
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (d / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_siglip_folder(hf_siglip):
    "The conftest SigLIP folder, with SigLIP's image processor (squash to 32x32, mean and std 0.5) saved beside it."
    from transformers import SiglipImageProcessor
    d = Path(hf_siglip.name)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def first_val_batch(model, path):
    "The validation batch a Trainer feeds `model` from `path` through a PairDataModule given nothing about the model."
    seen = []
    class Grab(L.Callback):
        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0): seen.append(batch)
    module = VLModule("builtin:micro", warmup_steps=1)
    module.model = model  # the model under test, with its tokenizer files; the data module is told nothing about it
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[Grab()], limit_val_batches=1).validate(module, PairDataModule(str(path), str(path),
                                                                                       batch_size=len(PHOTOS)))
    return seen[0]


def rgb(name): return Image.open(skimage_path(name)).convert("RGB")


def test_hf_siglip_gets_its_own_ids_and_pixels(photos, hf_siglip_folder):
    from transformers import AutoImageProcessor, AutoTokenizer
    model = create_model(f"hf:{hf_siglip_folder}")
    b = first_val_batch(model, photos)
    tok, proc = AutoTokenizer.from_pretrained(hf_siglip_folder), AutoImageProcessor.from_pretrained(hf_siglip_folder)
    want = tok(list(PHOTOS.values()), padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(b.text_ids, want["input_ids"]) and torch.equal(b.text_mask, want["attention_mask"].bool())
    assert torch.equal(b.images, proc(images=[rgb(k) for k in PHOTOS], return_tensors="pt")["pixel_values"])
    assert model.preprocess.resize == "squash" and b.images.shape[-1] == 32
    # SigLIP pools at the last position: the figures read the pooled token where the model does
    assert model.pooled_index(b.text_ids, b.text_mask).tolist() == [15] * len(PHOTOS)


def test_hf_clip_gets_its_own_ids_and_pixels(photos, hf_clip_folder):
    from transformers import AutoImageProcessor, AutoTokenizer
    model = create_model(f"hf:{hf_clip_folder}")
    b = first_val_batch(model, photos)
    tok, proc = AutoTokenizer.from_pretrained(hf_clip_folder), AutoImageProcessor.from_pretrained(hf_clip_folder)
    want = tok(list(PHOTOS.values()), padding=True, max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(b.text_ids, want["input_ids"]) and torch.equal(b.text_mask, want["attention_mask"].bool())
    assert torch.equal(b.images, proc(images=[rgb(k) for k in PHOTOS], return_tensors="pt")["pixel_values"])
    # CLIP's BPE here is open_clip's: the HF tokenizer built from it agrees with vlwb's own on real words
    from vlwb.text import Tokenizer
    ours, _ = Tokenizer(16)(list(PHOTOS.values()))
    # padding ids differ (0 vs end-of-text)
    assert torch.equal(ours[:, :b.text_ids.shape[1]][b.text_mask], b.text_ids[b.text_mask])
    # pooled where transformers pools: the end-of-text token
    assert torch.equal(model.pooled_index(b.text_ids, b.text_mask), b.text_mask.sum(1) - 1)


def test_open_clip_gets_its_own_ids_and_pixels(photos, open_clip_tiny):
    import open_clip
    b = first_val_batch(open_clip_tiny, photos)
    ids = open_clip.get_tokenizer("vlwb-test-vit")(list(PHOTOS.values()))
    assert torch.equal(b.text_ids, ids) and torch.equal(b.text_mask, ids != 0)
    _, _, preprocess = open_clip.create_model_and_transforms("vlwb-test-vit")
    assert torch.equal(b.images, torch.stack([preprocess(rgb(k)) for k in PHOTOS]))
    assert b.images.shape[-1] == 32


def test_builtin_keeps_its_own_inputs(photos):
    model = create_model("builtin:micro", image_size=32, context_length=12)
    b = first_val_batch(model, photos)
    assert b.images.shape[-2:] == (32, 32) and b.text_ids.shape[1] == 12


def test_the_command_line_links_model_inputs_into_the_data(hf_siglip_folder, world):
    cli = VLCLI(VLModule, PairDataModule,
                args=["--model.model", f"hf:{hf_siglip_folder}", "--data.train", str(world["train"])], run=False)
    assert cli.datamodule.tokenizer is cli.model.model.tokenizer
    assert cli.datamodule.preprocess == cli.model.model.preprocess and cli.datamodule.preprocess.size == 32


def test_vlwb_train_fine_tunes_open_clip_vit_b_32(tmp_path, world):
    out = tmp_path / "run"
    exe = shutil.which("vlwb")
    assert exe, "the vlwb console script is not installed (pip install -e .)"
    r = subprocess.run([exe, "train", "clip", "--model.model", "open_clip:ViT-B-32",
                        "--trainer.max_steps", "1", "--data.batch_size", "4",
                        "--data.shapes", str(Path(world["train"]).parent),
                        "--out", str(out), "--progress", "false", "--trainer.val_check_interval", "null"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    spec = json.loads((out / "checkpoint" / "config.json").read_text())["spec"]
    assert spec["backend"] == "open_clip" and spec["arch"] == "ViT-B-32"
    assert json.loads((out / "checkpoint" / "config.json").read_text())["global_step"] == 1


def test_frozen_towers_stay_bit_identical(world, tmp_path):
    from vlwb.train import make_trainer
    module = VLModule("builtin:micro", freeze=["visual.*", "patch_embed.*"], warmup_steps=1)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    make_trainer(tmp_path, max_steps=2, progress=False).fit(module, PairDataModule(str(world["train"]), batch_size=8))
    after = dict(module.model.named_parameters())
    frozen = [n for n in before if n.startswith(("visual.", "patch_embed."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["text_proj.weight"], after["text_proj.weight"])  # the rest trained
    with pytest.raises(ValueError, match="matches no parameter"):
        VLModule("builtin:micro", freeze=["vision_tower.*"])


def test_lora_trains_only_the_adapter_and_saves_it_alone(hf_clip_folder, world, tmp_path):
    from vlwb.models import load
    from vlwb.train import make_trainer
    torch.manual_seed(0)
    module = VLModule(f"hf:{hf_clip_folder}", lora={"r": 4}, warmup_steps=1, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    make_trainer(tmp_path, max_steps=2, progress=False).fit(module, PairDataModule(str(world["train"]), batch_size=8))
    after = dict(module.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)  # B left zero: it trained
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)  # the base did not move
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert set(saved) == set(lora)  # the adapter alone
    cfg = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert cfg["adapter"]["base"] == f"hf:{hf_clip_folder}" and cfg["adapter"]["r"] == 4
    back = load(tmp_path / "checkpoint")
    x, texts = torch.randn(2, 3, 32, 32), ["a red circle", "a blue square"]
    with torch.no_grad():
        module.model.eval()
        assert torch.allclose(back.encode_image(x).embed, module.model.encode_image(x).embed, atol=1e-6)
        assert torch.allclose(back.encode_text(texts).embed, module.model.encode_text(texts).embed, atol=1e-6)


def test_lora_on_open_clip_attention(open_clip_tiny):
    import copy
    from vlwb.models import add_lora
    m = copy.deepcopy(open_clip_tiny)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): want = m.encode_image(x).embed
    trained = add_lora(m, r=2)
    assert trained and {n for n, p in m.named_parameters() if p.requires_grad} == set(trained)
    # both towers' attention
    assert any(".visual." in n for n in trained) and any("net.transformer." in n for n in trained)
    # B = 0: unchanged at the start
    with torch.no_grad(): assert torch.allclose(m.encode_image(x).embed, want, atol=1e-6)
    enc = m.encode_image(x, attn=True)  # attention capture sees the adapted weights
    assert torch.allclose(enc.attn[0].sum(-1), torch.ones(2, 2, 17), atol=1e-5)
    m.encode_image(x).embed.sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
