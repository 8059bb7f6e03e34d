"""The speed options run on the CPU and agree with the default path (a GPU changes only the speed).

Tiny random U-Net (tests/conftest.py), 3-4 sampler steps. Tolerances: float32 options (channels_last,
compiled blocks, chunked vmap) agree to float32 rounding (1e-4); bfloat16 / float16 U-Nets with
float32 scheduler arithmetic: h within 3 % / 0.5 % (relative norm) of float32, images within a mean
absolute error of 0.0075 / 0.00125 (measured: 1.2 % / 0.15 % and 0.0010 / 0.00014). ``torch.compile`` is
exercised with the ``aot_eager`` backend, which traces through dynamo and AOTAutograd like
inductor but skips code generation (inductor's C++ build of this U-Net takes minutes on two cores;
``make bench`` compiles with inductor on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from hspace.accel import accelerate, eager, is_compiled
from hspace.directions import Direction
from hspace.jacobian import jacobian_directions
from hspace.model import HSpaceModel
from hspace.pca import IncrementalPCA
from hspace.sampling import Edit, HSpaceSampler
from tests.conftest import build_tiny_unet

SEEDS = [0, 1, 2]


def _model(dtype: torch.dtype = torch.float32) -> HSpaceModel:
    unet = build_tiny_unet().to(dtype)
    return HSpaceModel(unet, dict(DDPMScheduler(num_train_timesteps=1000).config), model_id="tiny")


def _edit(model: HSpaceModel) -> Edit:
    v = torch.randn(model.h_shape, generator=torch.Generator().manual_seed(5))
    return Edit(Direction(vector=v, name="v", kind="random", units="raw"), scales=2.0)


@pytest.fixture(scope="module")
def reference():
    """Default path: float32, eager, contiguous; plain sampling and an edited run."""
    model = _model()
    sampler = HSpaceSampler(model, num_inference_steps=4)
    return sampler.sample(SEEDS), sampler.sample(SEEDS, edit=_edit(model), record_h=False)


def test_channels_last_matches_default(reference):
    plain, edited = reference
    model = _model()
    accelerate(model.unet, channels_last=True)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    sampler = HSpaceSampler(model, num_inference_steps=4)
    out = sampler.sample(SEEDS)
    torch.testing.assert_close(out.h, plain.h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.images, plain.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        sampler.sample(SEEDS, edit=_edit(model), record_h=False).images, edited.images, atol=1e-4, rtol=0
    )


def test_compiled_sampler_matches_eager_and_compiles_once(reference):
    from torch._dynamo.utils import counters

    plain, edited = reference
    torch._dynamo.reset()
    model = _model()
    accelerate(model.unet, compile=True, backend="aot_eager")
    assert is_compiled(model.unet)
    counters.clear()
    out = HSpaceSampler(model, num_inference_steps=4).sample(SEEDS)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # dynamo did compile the blocks
    # more steps, an edit set and cleared at every step, h captured: no new graph
    longer = HSpaceSampler(model, num_inference_steps=6).sample(SEEDS, edit=_edit(model))
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert longer.h.shape[1] == 6
    torch.testing.assert_close(out.h, plain.h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.images, plain.images, atol=1e-4, rtol=0)
    edited_c = HSpaceSampler(model, num_inference_steps=4).sample(SEEDS, edit=_edit(model), record_h=False)
    torch.testing.assert_close(edited_c.images, edited.images, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs
    # the Jacobian runs the eager blocks (torch.func transforms do not enter compiled graphs)
    x = torch.randn(1, *model.image_shape, generator=torch.Generator().manual_seed(1))
    with eager(model.unet):
        ref = jacobian_directions(model, x, 500, 2, n_iter=2, init_seed=0)
    res = jacobian_directions(model, x, 500, 2, n_iter=2, init_seed=0)
    torch.testing.assert_close(res.singular_values, ref.singular_values)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_half_precision_keeps_scheduler_in_float32(reference, dtype, tol):
    plain, _ = reference
    model = _model(dtype)
    out = HSpaceSampler(model, num_inference_steps=4).sample(SEEDS, record_x=True)
    assert out.h.dtype == dtype and out.x_t.dtype == torch.float32
    # x_T is drawn in float32 from the seed, as for the float32 model: the same start noise
    torch.testing.assert_close(out.x_T, plain.x_T)
    err = (out.images - plain.images).abs()
    assert float(err.mean()) < tol / 4 and float(err.max()) < 4 * tol, (float(err.mean()), float(err.max()))
    h_rel = float((out.h.float() - plain.h).norm() / plain.h.norm())
    assert h_rel < tol, h_rel


def test_pinned_copies_are_a_no_op_path_on_the_cpu():
    model = _model()
    out = HSpaceSampler(model, num_inference_steps=3).sample(SEEDS)
    assert not out.h.is_pinned()  # pinned host buffers only when the model is on CUDA


@pytest.mark.parametrize("method", ["subspace", "krylov"])
def test_jacobian_chunked_vmap_bf16_and_batches(method):
    # the same iterations from the same start: chunking and batching change nothing but rounding
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *model.image_shape, generator=g)
    init = torch.randn(3, *model.h_shape, generator=g)
    kw = dict(n_iter=3, init=init, method=method)
    base = jacobian_directions(model, x, 500, 3, **kw)
    chunked = jacobian_directions(model, x, 500, 3, chunk_size=2, **kw)
    torch.testing.assert_close(chunked.singular_values, base.singular_values, rtol=1e-5, atol=1e-7)
    cos = (chunked.vectors.flatten(2) * base.vectors.flatten(2)).sum(-1).abs()
    assert float(cos.min()) > 0.9999
    single = jacobian_directions(model, x[1:], 500, 3, **kw)  # several images per call = one per call
    torch.testing.assert_close(single.singular_values[0], base.singular_values[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_size"):
        jacobian_directions(model, x, 500, 3, chunk_size=0)
    # bfloat16 JVPs / VJPs: the leading singular pair within bf16's ~1e-2
    bf = jacobian_directions(_model(torch.bfloat16), x, 500, 3, **kw)
    rel = ((bf.singular_values[:, 0] - base.singular_values[:, 0]).abs() / base.singular_values[:, 0]).max()
    assert float(rel) < 0.05, float(rel)
    cos0 = (bf.vectors[:, 0].flatten(1).float() * base.vectors[:, 0].flatten(1)).sum(-1).abs()
    assert float(cos0.min()) > 0.95, cos0


def test_pca_lowrank_solver_matches_gram():
    rng = np.random.default_rng(0)
    d, n, k = 2048, 600, 8
    q, _ = np.linalg.qr(rng.standard_normal((d, 12)))
    x = (rng.standard_normal((n, 12)) * (10 * 0.8 ** np.arange(12))) @ q.T + 0.1 * rng.standard_normal((n, d))
    x = torch.from_numpy(x)
    gram, low = IncrementalPCA(k), IncrementalPCA(k, solver="lowrank")
    for i in range(0, n, 200):
        gram.partial_fit(x[i : i + 200])
        low.partial_fit(x[i : i + 200])
    cos = (gram.components_ * low.components_).sum(1).abs()
    assert float(cos.min()) > 0.999, cos
    torch.testing.assert_close(low.singular_values_, gram.singular_values_, rtol=1e-4, atol=0)
    again = IncrementalPCA(k, solver="lowrank").partial_fit(x[:200])
    first = IncrementalPCA(k, solver="lowrank").partial_fit(x[:200])
    assert torch.equal(again.components_, first.components_)  # seeded: deterministic
    with pytest.raises(ValueError, match="solver"):
        IncrementalPCA(k, solver="nope")
