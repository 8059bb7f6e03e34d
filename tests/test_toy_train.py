"""The toy DDPM's training script is seeded and resumes exactly where it stopped."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from hspace.toy.train import min_snr_weights, train


def _weights(export_dir) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    kw = dict(batch_size=4, n_images=16, checkpoint_every=2, export_every=100, warmup=2, min_snr_gamma=5.0)
    straight = _weights(train(tmp_path / "straight", steps=4, **kw))
    halfway = _weights(train(tmp_path / "resumed", steps=2, **kw))
    resumed = _weights(train(tmp_path / "resumed", steps=4, **kw))
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert any(not torch.equal(halfway[k], resumed[k]) for k in resumed)  # it went on training
    # model, EMA, optimiser state and the per-step random draws all resume: same weights to rounding
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_the_same_seed_trains_the_same_weights(tmp_path):
    kw = dict(steps=3, batch_size=4, n_images=16, checkpoint_every=10, export_every=100, warmup=2)
    a = _weights(train(tmp_path / "a", seed=3, **kw))
    b = _weights(train(tmp_path / "b", seed=3, **kw))
    c = _weights(train(tmp_path / "c", seed=4, **kw))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_min_snr_weights_down_weight_only_the_nearly_clean_steps():
    alpha_bar = torch.tensor([0.9999, 0.99, 0.5, 0.01])  # SNR ~ 1e4, 99, 1, 0.01
    w = min_snr_weights(alpha_bar, gamma=5.0)
    assert torch.allclose(w[2:], torch.ones(2))
    assert w[0] < w[1] < 1.0
    assert torch.allclose(w[1], torch.tensor(5.0 / 99.0), rtol=1e-3)
    assert torch.equal(min_snr_weights(alpha_bar, gamma=0.0), torch.ones(4))
