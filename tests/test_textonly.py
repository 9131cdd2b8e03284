"""CLOSE's noise injection (`vlwb.textonly`): on in training only, unit norm kept, and a text-only classifier that
learns its texts and is noise-free when it is used."""
import torch

from vlwb.core import l2norm
from vlwb.textonly import GaussianNoise, train_text_classifier


def test_noise_only_in_training():
    t = torch.randn(256, 32)
    noise = GaussianNoise(0.2)
    assert torch.equal(noise.eval()(t), l2norm(t))
    noisy = noise.train()(t, torch.Generator().manual_seed(0))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(256), atol=1e-5)
    assert (noisy - l2norm(t)).norm(dim=-1).min() > 0.1
    assert torch.equal(GaussianNoise(0.0).train()(t), l2norm(t))


def test_text_classifier_is_used_without_noise():
    g = torch.Generator().manual_seed(0)
    centres = l2norm(torch.randn(4, 16, generator=g))
    labels = torch.arange(4).repeat(50)
    texts = centres[labels] + 0.05 * torch.randn(200, 16, generator=g)
    clf = train_text_classifier(texts, labels, 4, sigma=0.1, epochs=30, lr=1e-2)
    assert not clf.training and not clf[0].training
    assert torch.equal(clf(texts), clf(texts))  # deterministic: the noise is off when the model is used
    assert torch.allclose(clf(texts), clf[1](l2norm(texts)))
    assert (clf(texts).argmax(1) == labels).float().mean() > 0.95
