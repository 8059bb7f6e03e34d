"""The reference method for Jacobian directions, and a stopping oracle for equal-accuracy timing.

Reference: power iteration on J^T J one vector at a time (batch 1: one JVP and one VJP per
iteration), each vector deflated against the ones found before it. It is the benchmark's
baseline, not library code.

Equal accuracy: every method is stopped at the first iteration where its current vectors meet
the criterion against the explicit SVD (every |cos| >= ``COS_MIN`` and every singular value
within ``SIGMA_REL`` of the SVD's). For Alg. 1 / Alg. 2 / the block Krylov method the oracle wraps
``hspace.jacobian._ritz`` (called once per iteration with the Ritz vectors of the current block;
for the Krylov method of the whole basis, whose leading k are checked)
and, when the block's vectors meet the criterion, reports zero residuals so the library's own
loop returns; the oracle's own time is measured and subtracted. The reference checks each vector
after every iteration the same way. A method that stops at the criterion cannot do better with
a fixed iteration count, so the reference's time is a lower bound of a tuned fixed-count run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

import hspace.jacobian as jac

COS_MIN = 0.99
SIGMA_REL = 0.01
#: Per-vector / per-block stop of the sequential methods (reference, Alg. 2): deflation against
#: vectors stopped at exactly the final criterion left later blocks unable to meet it (Alg. 2,
#: blocks of 2, oversample 2 on the toy U-Net: block 3 not within 400 iterations).
SEQ_COS_MIN = 0.998
SEQ_SIGMA_REL = 0.005


class Criterion:
    """Reference right singular vectors [k, D] and values [k] (float64) of one image's J."""

    def __init__(
        self, v_ref: Tensor, s_ref: Tensor, cos_min: float = COS_MIN, sigma_rel: float = SIGMA_REL
    ) -> None:
        self.v_ref = v_ref / v_ref.norm(dim=1, keepdim=True)
        self.s_ref = s_ref
        self.cos_min, self.sigma_rel = cos_min, sigma_rel

    def stricter(self) -> Criterion:
        """The per-block stop of the sequential methods."""
        return Criterion(self.v_ref, self.s_ref, SEQ_COS_MIN, SEQ_SIGMA_REL)

    def check(self, start: int, v: Tensor, s: Tensor) -> tuple[bool, float, float]:
        """Vectors v [m, D] and values s [m] as indices start..start+m-1: (met, min |cos|, max rel err)."""
        m = v.shape[0]
        ref_v, ref_s = self.v_ref[start : start + m], self.s_ref[start : start + m]
        cos = ((v * ref_v).sum(1).abs() / v.norm(dim=1)).min()
        rel = ((s - ref_s).abs() / ref_s).max()
        return bool(cos >= self.cos_min and rel <= self.sigma_rel), float(cos), float(rel)


@contextmanager
def oracle_stop(criterion: Criterion, k: int, block: int | None, n_max: int):
    """Patch ``_ritz`` so each block of ``jacobian_directions`` stops when the criterion holds.

    Yields a dict: ``overhead`` (seconds spent checking), ``iterations`` per block, ``met`` per
    block, ``tol_needed`` (max residual / s_1^2 at the stop: the tol that would have stopped there).
    """
    original = jac._ritz
    blocks = [(0, k)] if block is None else [(s, min(s + block, k)) for s in range(0, k, block)]
    info: dict[str, Any] = {"overhead": 0.0, "iterations": [], "met": [], "tol_needed": [], "block": 0}
    state = {"it": 0, "s1": None}

    def ritz(v: Tensor, w: Tensor):
        v_r, lam, res = original(v, w)
        t0 = time.perf_counter()
        start, end = blocks[info["block"]]
        width = end - start
        state["it"] += 1
        s1 = float(lam[0, 0]) if state["s1"] is None else max(state["s1"], float(lam[0, 0]))
        met, _, _ = criterion.check(start, v_r[0, :, :width].T, lam[0, :width].sqrt())
        if met:
            info["iterations"].append(state["it"])
            info["met"].append(True)
            info["tol_needed"].append(float(res[0, :width].max()) / s1)
            info["block"] += 1
            state["it"] = 0
            state["s1"] = s1
            res = torch.zeros_like(res)
        elif state["it"] >= n_max:  # the library's loop ends this block now, unconverged
            info["block"] += 1
            state["it"] = 0
        info["overhead"] += time.perf_counter() - t0
        return v_r, lam, res

    jac._ritz = ritz
    try:
        yield info
    finally:
        jac._ritz = original


def reference_power_iteration(
    model: Any, x_t: Tensor, t: int, k: int, criterion: Criterion, *, n_max: int = 400, seed: int = 0
) -> dict[str, Any]:
    """Power iteration with deflation, one vector and one image at a time, stopped per vector by
    the criterion (or after ``n_max`` iterations). Returns seconds (checks excluded), iterations
    per vector and whether every vector met the criterion."""
    unet = getattr(model, "unet", model)
    g = torch.Generator().manual_seed(seed)
    overhead = 0.0
    t0 = time.perf_counter()
    found: list[Tensor] = []
    iters: list[int] = []
    met_all = True
    with torch.no_grad(), jac.forward_ad_safe(unet):
        split = jac.split_unet(unet, x_t[:1], t)
        f = split.decode
        h = split.h.detach()
        _, vjp = torch.func.vjp(f, h)
        shape = h.shape

        def jtj(v: Tensor) -> Tensor:
            u = torch.func.jvp(f, (h,), (v.reshape(shape).to(h.dtype),))[1]
            return vjp(u)[0].reshape(-1).to(torch.float64)

        for i in range(k):
            v = torch.randn(h.numel(), generator=g, dtype=torch.float64)
            met = False
            it = 0
            while it < n_max:
                it += 1
                for q in found:
                    v = v - q * (q @ v)
                v = v / v.norm()
                w = jtj(v)
                c0 = time.perf_counter()
                s = (v @ w).clamp_min(0).sqrt()
                met = criterion.check(i, v[None], s[None])[0]
                overhead += time.perf_counter() - c0
                v = w
                if met:
                    break
            v = v / v.norm()
            for q in found:
                v = v - q * (q @ v)
            found.append(v / v.norm())
            iters.append(it)
            met_all &= met
    return {"seconds": time.perf_counter() - t0 - overhead, "iterations": iters, "met": met_all}


def timed_library(
    fn: Callable[[], Any], info_factory: Callable[[], Any]
) -> tuple[float, dict[str, Any], Any]:
    """Run ``fn`` under the oracle context from ``info_factory``; seconds without the oracle's checks."""
    with info_factory() as info:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0 - info["overhead"]
    return seconds, info, result
