"""HSpaceModel: loading, dtypes, the mid-block hook, fingerprint, forward-AD-safe attention."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler

from hspace.model import HSpaceModel, use_forward_ad_safe_attention


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> HSpaceModel:
    return HSpaceModel.from_pretrained(tiny_model_dir)


def test_from_pretrained_reads_pipeline_layout(model, tiny_model_dir):
    assert model.image_shape == (3, 16, 16)
    assert model.h_shape == (32, 4, 4)  # block_out_channels[-1], 16 / 2**2
    assert model.mid_input_shape == (32, 4, 4)
    assert model.num_train_timesteps == 1000
    assert model.model_id == str(tiny_model_dir)
    assert not model.unet.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert isinstance(model.make_scheduler("ddpm"), DDPMScheduler)
    assert isinstance(model.make_scheduler("ddim"), DDIMScheduler)
    with pytest.raises(ValueError, match="kind"):
        model.make_scheduler("heun")


def test_bare_unet_dir_with_scheduler_config(tmp_path):
    build_tiny_unet().save_pretrained(tmp_path)
    config = dict(DDPMScheduler(num_train_timesteps=500, beta_end=0.01).config)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    loaded = HSpaceModel.from_pretrained(tmp_path)
    assert loaded.num_train_timesteps == 500
    assert loaded.make_scheduler("ddpm").config.beta_end == pytest.approx(0.01)


def test_missing_directory_raises_file_not_found(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        HSpaceModel.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HSpaceModel.from_pretrained(tmp_path)  # exists but holds no model


def test_fingerprint_ignores_load_path_and_tracks_weights(model):
    in_memory = HSpaceModel(build_tiny_unet(), dict(DDPMScheduler().config))
    assert in_memory.fingerprint == model.fingerprint  # same seed-0 weights and config
    changed = build_tiny_unet()
    with torch.no_grad():
        changed.conv_out.bias.add_(1e-3)
    assert HSpaceModel(changed, {}).fingerprint != model.fingerprint


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_and_runs(tiny_model_dir, model, dtype):
    half = HSpaceModel.from_pretrained(tiny_model_dir, dtype=dtype)
    assert half.dtype == dtype
    assert half.fingerprint == model.fingerprint  # hashed before the cast
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), half.hooks() as hook:
        out = half.predict_noise(x.to(dtype), 500)
    ref = model.predict_noise(x, 500)
    assert out.dtype == dtype and hook.h.dtype == dtype and hook.h.shape == (2, 32, 4, 4)
    # half precision rounding through ~20 layers: a loose bound that still catches garbage
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_hook_captures_h_and_mid_input_exactly_and_is_removed(model):
    seen = {}

    def spy(module, args, output):
        seen["input"], seen["output"] = args[0].clone(), output.clone()

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    handle = model.unet.mid_block.register_forward_hook(spy)
    try:
        plain = model.predict_noise(x, 700)
        with model.hooks(capture_input=True) as hook:
            hooked = model.predict_noise(x, 700)
            # the hook alone must not change anything: bit-identical output and h
            assert torch.equal(hooked, plain)
            assert torch.equal(hook.h, seen["output"])
            assert torch.equal(hook.mid_input, seen["input"])
            assert len(model.unet.mid_block._forward_hooks) == 2
    finally:
        handle.remove()
    assert len(model.unet.mid_block._forward_hooks) == 0


def test_hook_delta_and_replace_feed_the_decoder(model):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with model.hooks() as hook:
        plain = model.predict_noise(x, 300)
        h0 = hook.h.clone()
        delta = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(3))
        hook.delta = delta
        shifted = model.predict_noise(x, 300)
        assert torch.allclose(hook.h, h0 + delta, atol=1e-6)
        assert (shifted - plain).abs().max() > 1e-3  # the decoder saw the edited h
        hook.delta = None
        hook.replace = h0
        assert torch.equal(model.predict_noise(x, 300), plain)  # replacing h by itself: no change
        hook.replace = torch.zeros(2, 32, 4, 4)
        model.predict_noise(x, 300)
        assert torch.equal(hook.h, torch.zeros(2, 32, 4, 4))


def test_forward_ad_safe_attention_keeps_outputs_and_enables_jvp(model):
    from diffusers.models.attention_processor import AttnProcessor

    unet = copy.deepcopy(model.unet)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    before = unet(x, 250).sample
    use_forward_ad_safe_attention(unet)
    processors = [m.processor for m in unet.modules() if hasattr(m, "set_processor")]
    assert processors and all(isinstance(p, AttnProcessor) for p in processors)
    after = unet(x, 250).sample
    assert (after - before).abs().max() <= 1e-5  # same math, different kernel: fp32 rounding only

    # forward-mode JVP in fp32 (the real use) against a float64 central difference. The
    # attention upcasts its softmax to fp32 even in float64, so the difference step must stay
    # large: eps = 1e-3 measured a 2.3e-5 error (truncation + fp32 softmax), bound 1e-4.
    v = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    _, jvp = torch.func.jvp(lambda inp: unet(inp, 250).sample, (x,), (v,))
    unet64 = copy.deepcopy(unet).double()
    f64 = lambda inp: unet64(inp, 250).sample  # noqa: E731
    eps = 1e-3
    fd = (f64(x.double() + eps * v.double()) - f64(x.double() - eps * v.double())) / (2 * eps)
    assert (jvp.double() - fd).abs().max() <= 1e-4


def test_resolve_model_source_maps_only_the_toy_names():
    from hspace.model import HUB_ID
    from hspace.toy import TOY_MODEL_DIR, TOY_TEXT_MODEL_DIR, resolve_model_source

    assert resolve_model_source("toy") == TOY_MODEL_DIR
    assert resolve_model_source("toy-text") == TOY_TEXT_MODEL_DIR
    assert resolve_model_source("toy_text") == "toy_text"  # only the exact names
    assert resolve_model_source("google/ddpm-ema-celebahq-256") == "google/ddpm-ema-celebahq-256"
    assert resolve_model_source(Path("toy")) == Path("toy")  # a local directory named toy stays one
    assert HUB_ID.match("google/ddpm-ema-celebahq-256") and not HUB_ID.match("./models/ddpm")


def test_toy_model_name_reads_the_name_or_the_shipped_directory_back():
    from hspace.toy import TOY_MODEL_DIR, TOY_TEXT_MODEL_DIR, toy_model_name

    assert toy_model_name("toy") == "toy" and toy_model_name("toy-text") == "toy-text"
    assert toy_model_name(str(TOY_MODEL_DIR)) == "toy"
    assert toy_model_name(TOY_TEXT_MODEL_DIR / ".." / "text") == "toy-text"
    assert toy_model_name(str(TOY_MODEL_DIR.parent)) is None  # the weights folder is no model
    assert toy_model_name("google/ddpm-ema-celebahq-256") is None and toy_model_name(None) is None
