import os
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from vlwb.train import quiet_lightning  # noqa: E402

quiet_lightning()


def pytest_configure(config):
    # pytest resets warning filters for every test: repeat quiet_lightning's as ini lines
    for pattern in ("does not have many workers", "LeafSpec", "Total length of `list` across ranks is zero",
                    "train_dataloader yielded None"):
        config.addinivalue_line("filterwarnings", f"ignore:.*{pattern}")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    "A small shapes world (seed 0): split name -> JSONL path."
    from vlwb.shapes import generate_shapes_world
    return generate_shapes_world(tmp_path_factory.mktemp("world"), n_train=48, n_val=8, n_test=30, seed=0,
                                 progress=False)


@pytest.fixture(scope="session")
def open_clip_tiny():
    "An untrained open_clip ViT built from a small config registered here (no download)."
    import torch
    from open_clip.factory import _MODEL_CONFIGS
    from vlwb.models import create_model
    _MODEL_CONFIGS["vlwb-test-vit"] = dict(embed_dim=32,
                                           vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8,
                                                           head_width=32),
                                           text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2,
                                                         layers=2))
    torch.manual_seed(0)
    return create_model("open_clip:vlwb-test-vit").eval()


def hf_config(kind):
    "A small transformers CLIP ('clip') or SigLIP ('siglip') config dict."
    from transformers import CLIPConfig, SiglipConfig
    t = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=16)
    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8)
    if kind == "clip": return CLIPConfig(text_config=t, vision_config=v, projection_dim=24).to_dict()
    return SiglipConfig(text_config=dict(t, vocab_size=1000), vision_config=v).to_dict()


@pytest.fixture(scope="session")
def filip_model(tmp_path_factory):
    """builtin:micro trained with filip for 150 steps on a 2,000-image shapes world (about 1.5 minutes): (model, test
    split, run dir)."""
    from vlwb.recipes import train_viz_model
    out = tmp_path_factory.mktemp("viz-filip")
    model, test = train_viz_model(out, steps=150, progress=False)
    return model, test, out


@pytest.fixture(scope="session")
def hf_siglip(tmp_path_factory):
    "An untrained transformers SigLIP saved to a local folder with a small word-level tokenizer, loaded as 'hf:FOLDER'."
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from vlwb.models import create_model
    from vlwb.shapes import SHAPES, COLORS
    words = ["a", "an", "the", "of", "and", "left", "right", "above", "below", "big", "small", *COLORS, *SHAPES]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    d = tmp_path_factory.mktemp("hf-siglip") / "siglip"
    create_model({"backend": "hf", "config": hf_config("siglip")}).net.save_pretrained(d)
    fast.save_pretrained(d)
    return create_model(f"hf:{d}").eval()


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory):
    """builtin:micro trained with clip for 150 steps (colour is learned by then, shape not yet): (checkpoint dir, test
    split)."""
    from vlwb.recipes import train_viz_model
    out = tmp_path_factory.mktemp("clip-micro")
    _, test = train_viz_model(out, objective="clip", progress=False)
    return out / "checkpoint", test
