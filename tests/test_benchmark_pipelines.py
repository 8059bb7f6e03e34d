"""The benchmark suite's random-weight pipelines build and run (the benchmarks are not part of
``make test``; this keeps their shared builders from breaking unseen)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parent / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_stable_diffusion_encodes_its_prompts_and_negative_prompts():
    text = _module("_text_pipelines")
    pipe = text.stable_diffusion(dict(text.BENCH_UNET, sample_size=8), dict(text.TINY_VAE, sample_size=16))
    cond, uncond = pipe.encode_prompt(text.PROMPTS, "cpu", 1, True, negative_prompt=text.NEGATIVE * 2)
    assert cond.shape == uncond.shape == (len(text.PROMPTS), pipe.tokenizer.model_max_length, 32)
    assert torch.isfinite(cond).all() and not torch.equal(cond, uncond)
