"""Image-specific directions from the Jacobian d eps / d h (paper section IV-B, eqs. 6-9, Alg. 1-2).

At one image x_t and timestep t, J_t = d eps_t / d h_t with x_t and the skip connections fixed
(eq. 6). Its top right singular vectors are the directions in h-space that change the noise
prediction most. They are found without forming J:

- :func:`split_denoiser` runs the model's denoiser forward once (any kind: UNet2DModel,
  UNet2DConditionModel with its text / SDXL conditioning, DiT), recording the outputs of the
  modules that finish before the capture module starts (time embedding, ``conv_in``, the down
  blocks that collect the skip connections; DiT's patch embedding and the blocks before h), and
  returns a ``decode(h)`` that is the same forward with those modules answering their recorded
  outputs and h in place of the capture module's output: the decoder half is the model's own
  modules in diffusers' own order, never a copy of a forward, and only the part after h runs;
- under classifier-free guidance the differentiated output is the guided noise with h moved in
  both branches (``branch="guided"``, what an edit changes) or one branch's eps;
- J V by forward-mode AD (``torch.func.jvp``, eq. 8) vmapped over the k tangents, and J^T U by
  reverse mode through one ``torch.func.vjp`` function kept for all iterations (eq. 7);
- subspace iteration (Alg. 1: QR, then V <- left singular vectors of J^T J V) or its sequential
  mini-batch variant with deflation (supplementary Alg. 2), with a Rayleigh-Ritz rotation of the
  iterate (free: it reuses J^T J V) for the reported singular values and residuals
  ||J^T J v - s^2 v||;
- block Krylov iteration (``method="krylov"``): the same products, but each new block J^T J Q
  is orthogonalised against all blocks before it and Rayleigh-Ritz runs on the whole basis
  [Q_0, ..., Q_j] (block Lanczos with full reorthogonalisation). Its error falls with the
  Chebyshev polynomial of the spectrum instead of its power, so it needs about half the products
  of Alg. 1 at equal accuracy (docs/benchmarks.md);
- an optional mask M over eps's grid restricts the output to a region: J_masked = d (eps * M) / d h
  (eq. 9).

Images in a batch are independent (the decoder mixes nothing across the batch in eval mode), so
B images are handled in one call with per-image subspaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hspace.conditioning import Condition, ConditionRequest, cycle
from hspace.directions import Direction
from hspace.model import HSpaceHook, HSpaceModel, forward_ad_safe

# ---------------------------------------------------------------------- the denoiser split at h
#: Which output a Jacobian differentiates under classifier-free guidance: the guided noise
#: ``eps_u + g (eps_c - eps_u)`` with h moved by the same vector in both branches (as an
#: :class:`~hspace.sampling.Edit` with ``branches="both"`` does), or one branch's own output.
JacobianBranch = Literal["guided", "cond", "uncond"]
JACOBIAN_BRANCHES = ("guided", "cond", "uncond")
_MISSING = object()


def _stage_modules(denoiser: nn.Module, capture: str) -> list[nn.Module]:
    """The modules that can run before the capture module: the children of each module on the path
    from the denoiser to the capture module, except that path (the items of a ModuleList or
    ModuleDict, which is never called itself, stand for it)."""
    path = capture.split(".")
    on_path = {".".join(path[:i]) for i in range(len(path) + 1)}
    out: list[nn.Module] = []

    def add(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full in on_path:
                continue
            if isinstance(child, nn.ModuleList | nn.ModuleDict):
                add(full, child)
            else:
                out.append(child)

    for i in range(len(path)):
        parent = ".".join(path[:i])
        add(parent, denoiser.get_submodule(parent))
    return list(dict.fromkeys(out))  # a module registered under two names is one module


def _next_or_run(calls: Iterator[Any], forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    recorded = next(calls, _MISSING)
    return forward(*args, **kwargs) if recorded is _MISSING else recorded


@contextmanager
def _forwards(replacements: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Give each module another ``forward`` for the block (its own instance attribute, e.g. a
    compiled block's, is put back afterwards)."""
    saved = [(module, module.__dict__.get("forward", _MISSING)) for module in replacements]
    try:
        for module, forward in replacements.items():
            module.forward = forward
        yield
    finally:
        for module, own in saved:
            if own is _MISSING:
                del module.forward
            else:
                module.forward = own


def _branch_kwargs(value: Any, rows: slice, call_rows: int) -> Any:
    """The call kwargs of one branch: every tensor with ``call_rows`` rows cut to ``rows``."""
    if torch.is_tensor(value):
        return value[rows] if value.ndim and value.shape[0] == call_rows else value
    if isinstance(value, dict):
        return {k: _branch_kwargs(v, rows, call_rows) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_branch_kwargs(v, rows, call_rows) for v in value)
    return value


def branch_condition(condition: Condition, branch: JacobianBranch, conditioning: str = "none") -> Condition:
    """The Condition of the call whose output a Jacobian differentiates (see :data:`JacobianBranch`).

    ``"guided"`` is ``condition`` itself (one branch when it is unguided); ``"cond"`` / ``"uncond"``
    cut a guided condition to that branch's rows. An unguided condition is its own ``"cond"``
    branch, and its ``"uncond"`` branch only for an unconditional model (``conditioning="none"``).
    """
    if branch not in JACOBIAN_BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(map(repr, JACOBIAN_BRANCHES))}, got {branch!r}")
    if branch == "guided":
        return condition
    if not condition.guided:
        if branch == "uncond" and conditioning != "none":
            raise ValueError(
                f"branch='uncond': this {conditioning}-conditional call has no unconditional branch "
                "(guidance_scale <= 1, or the model has no null class)"
            )
        return condition
    rows = condition.branch_rows(branch)
    kwargs = _branch_kwargs(condition.kwargs, rows, 2 * condition.rows)
    return Condition(kwargs, condition.rows, guidance_scale=condition.guidance_scale)


@dataclass
class DenoiserSplit:
    """The model's denoiser cut at its capture point for one call: ``h`` and ``decode(h)``.

    ``decode(h)`` is the denoiser's own forward (:meth:`HSpaceModel.predict`) in which the modules
    that finished before the capture module started (time embeddings, ``conv_in``, the down
    blocks that hold the skip connections; DiT's patch embedding and the blocks before h) answer
    their recorded outputs, and h [B, C, H, W] (map layout; a transformer's tokens through the
    capture point's grid) takes the place of the capture module's output (its other outputs, such
    as a down block's skips, stay as recorded) or input. So x_t, the conditioning and the skip
    connections are fixed (paper eq. 6) and only the part after h is computed.

    Under guidance (``branch="guided"``) h is the conditional branch's; the unconditional branch
    gets ``h + (h_uncond - h_cond)`` (both move by the same vector, as an edit in both branches)
    and ``decode`` returns the guided noise. With ``"cond"`` / ``"uncond"`` the call holds that
    branch only. A learned-variance output's second half (DiT) is dropped, as the sampler does.
    """

    model: Any
    x: Tensor
    timesteps: Tensor
    condition: Condition
    branch: str
    h: Tensor
    recorded: dict[nn.Module, list[Any]]
    capture_value: Any
    other_offset: Tensor | None = None

    def call_h(self, h: Tensor) -> Tensor:
        """h of the whole call batch: both branches under guidance, in the call's branch layout."""
        if self.other_offset is None:
            return h
        other = h + self.other_offset
        return torch.cat([other, h]) if self.condition.uncond_first else torch.cat([h, other])

    def decode(self, h: Tensor) -> Tensor:
        """eps (guided for ``branch="guided"``) from h [B, C, H, W], through the denoiser's forward."""
        model = self.model
        layout = HSpaceHook(grid=model.token_grid)
        full = self.call_h(h)
        forwards: dict[nn.Module, Callable[..., Any]] = {}
        for module, outputs in self.recorded.items():
            calls = iter(outputs)
            forward = module.forward

            def answer(*args: Any, _calls=calls, _forward=forward, **kwargs: Any) -> Any:
                return _next_or_run(_calls, _forward, args, kwargs)

            forwards[module] = answer
        capture = model.denoiser.get_submodule(model.capture.module)
        value = self.capture_value
        first = value[0] if isinstance(value, tuple) else value
        new = layout.from_map(full, first)
        handles = []
        if model.capture.where == "output":
            out = (new, *value[1:]) if isinstance(value, tuple) else new
            forwards[capture] = lambda *args, **kwargs: out
        else:

            def enter(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            handles.append(capture.register_forward_pre_hook(enter, with_kwargs=True))
        try:
            with _forwards(forwards):
                eps = model.predict(self.x, self.timesteps, self.condition)
        finally:
            for handle in handles:
                handle.remove()
        return self.condition.guide(eps) if self.branch == "guided" else eps


#: The name of the split when h was always a UNet2DModel's mid-block output.
UNetSplit = DenoiserSplit


def _timestep_batch(timestep: int | float | Tensor, sample: Tensor) -> Tensor:
    """A number or a tensor [] / [1] / [B] -> one timestep per image, [B] on the sample's device."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    if timesteps.shape[0] not in (1, sample.shape[0]):
        raise ValueError(f"timestep has {timesteps.shape[0]} entries for a batch of {sample.shape[0]}")
    return timesteps.to(sample.device) * torch.ones(
        sample.shape[0], dtype=timesteps.dtype, device=sample.device
    )


def as_hspace_model(model: Any) -> HSpaceModel:
    """``model`` itself, or a bare diffusers U-Net wrapped in an :class:`HSpaceModel` (eval, no grad)."""
    if isinstance(model, HSpaceModel):
        return model
    if isinstance(model, nn.Module):
        return HSpaceModel(model, {})
    raise TypeError(f"model must be an HSpaceModel or a diffusers denoiser, got {type(model).__name__}")


def jacobian_condition(
    model: HSpaceModel,
    n: int,
    *,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    class_labels: int | Sequence[int] | Tensor | None = None,
    guidance_scale: float | None = None,
    branch: JacobianBranch = "guided",
) -> ConditionRequest:
    """The conditioning request of a Jacobian for ``n`` images, checked as the sampler checks it.

    The guidance scale defaults to the model's (as the sampler's does); ``branch="uncond"`` on a
    model with guidance at a scale <= 1 uses the model's default scale, only so that the call has an
    unconditional branch to cut out (the scale itself does not enter that branch).
    """
    if branch not in JACOBIAN_BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(map(repr, JACOBIAN_BRANCHES))}, got {branch!r}")
    if torch.is_tensor(class_labels):
        class_labels = [int(c) for c in class_labels.reshape(-1).tolist()]
    conditioner = model.conditioner
    request = ConditionRequest(
        prompts=cycle(prompt, n, "prompt"),
        negative_prompts=cycle(negative_prompt, n, "negative_prompt"),
        class_labels=cycle(class_labels, n, "class_labels"),
    )
    conditioner.check(request)
    g = conditioner.resolve_guidance(guidance_scale)
    if branch == "uncond" and conditioner.supports_guidance and g <= 1:
        g = max(conditioner.default_guidance, 2.0)
    request.guidance_scale = g
    return request


@torch.no_grad()
def split_denoiser(
    model: Any,
    x_t: Tensor,
    timestep: int | float | Tensor,
    condition: Condition | None = None,
    *,
    branch: JacobianBranch = "guided",
) -> DenoiserSplit:
    """Run the denoiser's forward once on x_t [B, *latent_shape] (the denoiser's input) under
    ``condition`` (a :class:`Condition` for the B images; none for an unconditional model),
    recording, in call order, the outputs of the modules that finish before the capture module
    starts, and return the split at h (see :class:`DenoiserSplit`)."""
    model = as_hspace_model(model)
    if x_t.ndim != 1 + len(model.latent_shape):
        raise ValueError(
            f"x_t must be [B, {', '.join(map(str, model.latent_shape))}], got {tuple(x_t.shape)}"
        )
    if condition is None:
        condition = Condition({}, int(x_t.shape[0]))
    if condition.rows != x_t.shape[0]:
        raise ValueError(f"the condition is for {condition.rows} images, x_t has {x_t.shape[0]}")
    call = branch_condition(condition, branch, model.conditioner.name)
    sample = x_t.to(device=model.device, dtype=model.dtype).contiguous()
    timesteps = _timestep_batch(timestep, sample)
    x, call_timesteps = call.model_input(sample), call.model_input(timesteps)

    denoiser = model.denoiser
    capture = denoiser.get_submodule(model.capture.module)
    stages = _stage_modules(denoiser, model.capture.module)
    recorded: dict[nn.Module, list[Any]] = {m: [] for m in stages}
    seen: dict[str, Any] = {}

    def record(module: nn.Module, _args: tuple, output: Any) -> None:
        if "capture" not in seen:
            recorded[module].append(output)

    def started(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("capture", args[0] if args else kwargs["hidden_states"])

    def finished(_m: nn.Module, _args: tuple, output: Any) -> None:
        seen.setdefault("output", output)

    handles = [m.register_forward_hook(record) for m in stages]
    handles.append(capture.register_forward_pre_hook(started, with_kwargs=True))
    handles.append(capture.register_forward_hook(finished))
    try:
        with model.hooks() as hook:
            model.predict(x, call_timesteps, call)
    finally:
        for handle in handles:
            handle.remove()
    if hook.calls != 1:
        raise ValueError(
            f"the capture module {model.capture.spec!r} ran {hook.calls} times in one forward; "
            "the split needs it to run once"
        )
    h_call = hook.h
    assert h_call is not None
    value = seen["output"] if model.capture.where == "output" else seen["capture"]
    offset = None
    if branch == "guided" and call.guided:
        h = h_call[call.branch_rows("cond")]
        offset = (h_call[call.branch_rows("uncond")] - h).contiguous()
    else:
        h = h_call
    return DenoiserSplit(
        model=model,
        x=x,
        timesteps=call_timesteps,
        condition=call,
        branch=branch,
        h=h.contiguous(),
        recorded={m: outs for m, outs in recorded.items() if outs},
        capture_value=value,
        other_offset=offset,
    )


def split_unet(
    unet: nn.Module, x_t: Tensor, timestep: int | float | Tensor, class_labels: Tensor | None = None
) -> DenoiserSplit:
    """:func:`split_denoiser` for a bare UNet2DModel (``class_labels`` for a class-conditional one).

    ``timestep`` is a number or a tensor [] / [B].
    """
    model = as_hspace_model(unet)
    condition = None
    if class_labels is not None or model.conditioner.name != "none":
        request = jacobian_condition(model, int(x_t.shape[0]), class_labels=class_labels)
        condition = model.conditioner.encode(request, int(x_t.shape[0]), model.device, model.dtype)
    return split_denoiser(model, x_t, timestep, condition)


def _broadcast_mask(mask: Tensor | None, batch: int, out_hw: tuple[int, int], like: Tensor) -> Tensor | None:
    """Mask [H, W], [1, H, W], [B, H, W], [1|B, 1, H, W] -> [1|B, 1, H, W] in ``like``'s dtype."""
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[None] if m.shape[0] == 1 else m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[0] not in (1, batch) or tuple(m.shape[-2:]) != out_hw:
        raise ValueError(
            f"mask must be [H, W], [1, H, W], [B, H, W] or [B, 1, H, W] with (H, W) = {out_hw} and "
            f"B in (1, {batch}); got shape {tuple(torch.as_tensor(mask).shape)}"
        )
    if not bool(torch.isfinite(m.float()).all()):
        raise ValueError("mask has non-finite values")
    return m.to(device=like.device, dtype=like.dtype)


def _masked_decoder(split: UNetSplit, mask: Tensor | None) -> Callable[[Tensor], Tensor]:
    if mask is None:
        return split.decode

    def f(h: Tensor) -> Tensor:
        return split.decode(h) * mask

    return f


# ---------------------------------------------------------------------- explicit Jacobian (tests)
def explicit_jacobian(
    model: Any,
    x_t: Tensor,
    timestep: int | float | Tensor,
    *,
    mask: Tensor | None = None,
    class_labels: int | Sequence[int] | Tensor | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    guidance_scale: float | None = None,
    branch: JacobianBranch = "guided",
    chunk_size: int | None = 256,
) -> Tensor:
    """The full Jacobian d(eps [* M]) / dh for each image: [B, out, D] (out = the numel of one
    image's eps, D of its h), by reverse mode (``torch.func.jacrev``) one image at a time, with
    the conditioning and ``branch`` of :func:`jacobian_directions`. Only for tiny models (tests)."""
    hmodel = as_hspace_model(model)
    b = x_t.shape[0]
    ts = torch.as_tensor(timestep).reshape(-1)
    request = jacobian_condition(
        hmodel, b, prompt=prompt, negative_prompt=negative_prompt, class_labels=class_labels,
        guidance_scale=guidance_scale, branch=branch,
    )  # fmt: skip
    out = []
    with torch.no_grad(), forward_ad_safe(hmodel.denoiser):
        for i in range(b):
            t_i = ts[i] if ts.shape[0] == b else ts[0]
            condition = hmodel.conditioner.encode(
                request.rows(slice(i, i + 1)), 1, hmodel.device, hmodel.dtype
            )
            split = split_denoiser(hmodel, x_t[i : i + 1], t_i, condition, branch=branch)
            m = _broadcast_mask(mask, b, tuple(x_t.shape[-2:]), split.h)
            f = _masked_decoder(split, m[i : i + 1] if m is not None and m.shape[0] == b else m)
            jac = torch.func.jacrev(f, chunk_size=chunk_size)(split.h)
            out.append(jac.reshape(-1, split.h.numel()))
    return torch.stack(out)


# ---------------------------------------------------------------------- subspace iteration
@dataclass
class JacobianResult:
    """Top-k right singular vectors of J (or J_masked) per image.

    vectors [B, k, C, H, W] (unit norm, by decreasing singular value), singular_values [B, k],
    residuals [B, k] = ||J^T J v - s^2 v||, converged [B] (residual <= tol * s_1^2 for all k),
    iterations (operator applications in total) and block_iterations (one entry per block; one
    block for Alg. 1). left_vectors [B, k, 3, H, W] = J v / s when requested.
    """

    vectors: Tensor
    singular_values: Tensor
    residuals: Tensor
    converged: Tensor
    iterations: int
    block_iterations: list[int]
    left_vectors: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_directions(
        self,
        image: int = 0,
        *,
        name_prefix: str = "jacobian",
        seed: int | None = None,
        step: int | None = None,
        model_fingerprint: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> list[Direction]:
        """Directions ``<name_prefix>_<i>`` (kind "jacobian", unit [C, H, W] applied at every step)
        for image ``image``; ``seed``/``step`` say where x_t came from.

        Provenance: the search settings (``meta``: method, k, n_iter, tol, oversample, block_size,
        init_seed, timestep, mask, capture, branch, guidance_scale; this image's prompt,
        negative_prompt or class_label where given) plus, per vector, index, singular_value, residual, seed, step,
        iterations and whether this image converged; ``provenance`` adds or overrides keys.
        """
        if not 0 <= image < self.vectors.shape[0]:
            raise ValueError(f"image {image} out of range for a batch of {self.vectors.shape[0]}")
        fp = model_fingerprint if model_fingerprint is not None else self.meta.get("model_fingerprint")
        per_image = {
            "prompts": "prompt",
            "negative_prompts": "negative_prompt",
            "class_labels": "class_label",
        }
        shared = {k: v for k, v in self.meta.items() if k != "model_fingerprint" and k not in per_image}
        shared |= {per_image[k]: v[image] for k, v in self.meta.items() if k in per_image}
        shared |= {
            "seed": seed,
            "step": step,
            "timestep": _timestep_of(self.meta.get("timestep"), image),
            "iterations": int(self.iterations),
            "converged": bool(self.converged[image]),
            "note": "found at one step, applied at every step",
        }
        return [
            Direction(
                vector=self.vectors[image, i].detach().to(torch.float32).cpu(),
                name=f"{name_prefix}_{i}",
                kind="jacobian",
                units="unit",
                model_fingerprint=fp,
                capture=self.meta.get("capture"),
                provenance=shared
                | {
                    "index": i,
                    "singular_value": float(self.singular_values[image, i]),
                    "residual": float(self.residuals[image, i]),
                }
                | dict(provenance or {}),
            )
            for i in range(self.vectors.shape[1])
        ]


def _timestep_of(ts: Any, image: int) -> Any:
    return ts[image] if isinstance(ts, list) else ts


def _mask_info(mask: Tensor | None) -> dict[str, Any] | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask).detach().to(torch.float32).cpu().contiguous()
    rows, cols = (torch.nonzero((m != 0).reshape(-1, *m.shape[-2:]).any(0).any(a)).flatten() for a in (1, 0))
    box = [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1] if len(rows) else None
    return {
        "shape": list(m.shape),
        "box": box,  # [y0, x0, y1, x1] (end-exclusive) around the nonzero pixels
        "coverage": float((m != 0).float().mean()),
        "sha256": hashlib.sha256(m.numpy().tobytes()).hexdigest()[:16],
    }


class _Operators:
    """J V and J^T J V for per-image blocks V [B, D, m] (float64 in, float64 out)."""

    def __init__(self, f: Callable[[Tensor], Tensor], h: Tensor, chunk_size: int | None = None) -> None:
        self.f = f
        self.h = h
        self.chunk_size = chunk_size  # tangents per vmapped call (None: all at once)
        self.h_shape = tuple(h.shape[1:])
        _, self._vjp = torch.func.vjp(f, h)  # one linearisation for every iteration
        self.applications = 0

    def _tangents(self, v: Tensor) -> Tensor:
        b, _, m = v.shape
        return v.permute(2, 0, 1).reshape(m, b, *self.h_shape).to(self.h.dtype).contiguous()

    def jv(self, v: Tensor) -> Tensor:
        """J V: [B, D, m] -> [m, B, *out] (batched forward mode, eq. 8)."""

        def one(t: Tensor) -> Tensor:
            return torch.func.jvp(self.f, (self.h,), (t,))[1]

        return torch.func.vmap(one, chunk_size=self.chunk_size)(self._tangents(v))

    def jt(self, u: Tensor) -> Tensor:
        """J^T U: [m, B, *out] -> [B, D, m] (reverse mode through the kept VJP, eq. 7)."""
        w = torch.func.vmap(self._vjp, chunk_size=self.chunk_size)(u)[0]
        m, b = w.shape[:2]
        return w.reshape(m, b, -1).permute(1, 2, 0).to(torch.float64)

    def jtj(self, v: Tensor) -> Tensor:
        self.applications += 1
        return self.jt(self.jv(v))


def _orthonormalize(v: Tensor) -> Tensor:
    q, _ = torch.linalg.qr(v)
    return q


def _ritz(v: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on span(V) with W = J^T J V: rotated V, eigenvalues (desc) and residuals."""
    m = v.transpose(1, 2) @ w
    lam, r = torch.linalg.eigh((m + m.transpose(1, 2)) / 2)
    lam, r = lam.flip(-1), r.flip(-1)
    v_r, w_r = v @ r, w @ r
    res = (w_r - v_r * lam[:, None, :]).norm(dim=1)
    return v_r, lam.clamp_min(0), res


def _subspace_block(
    ops: _Operators,
    v0: Tensor,
    n_check: int,
    n_iter: int,
    tol: float,
    scale: Tensor | None,
    deflate: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Subspace iteration on one block (Alg. 1 body; with ``deflate`` the Alg. 2 body).

    Returns Ritz vectors [B, D, m], eigenvalues of J^T J [B, m], residuals [B, m], converged [B]
    (first ``n_check`` residuals <= tol * scale) and the number of iterations.
    """
    v = _orthonormalize(v0)
    for it in range(1, n_iter + 1):
        if deflate is not None:
            v = _orthonormalize(v - deflate @ (deflate.transpose(1, 2) @ v))
        w = ops.jtj(v)
        v_r, lam, res = _ritz(v, w)
        ref = lam[:, :1] if scale is None else torch.maximum(scale[:, None], lam[:, :1])
        converged = (res[:, :n_check] <= tol * ref).all(dim=1)
        if bool(converged.all()) or it == n_iter:
            return v_r, lam, res, converged, it
        v = torch.linalg.svd(w, full_matrices=False)[0]  # V <- left singular vectors of J^T J V
    raise AssertionError("unreachable")


#: Most blocks a Krylov basis holds before a thick restart from its Ritz vectors (at least
#: 2 (k + block) vectors): bounds memory to 2 such bases of float64 vectors per image and the
#: Rayleigh-Ritz cost.
KRYLOV_MAX_BLOCKS = 12


def _extend_basis(basis: Tensor, w: Tensor, gen: torch.Generator) -> Tensor:
    """An orthonormal block spanning the part of W [B, D, m] outside span(basis) [B, D, n].

    Two passes of block Gram-Schmidt; a column with (numerically) nothing left, as when the
    Krylov space is exhausted, is replaced by a random one so that the block keeps full rank.
    """
    x = w - basis @ (basis.transpose(1, 2) @ w)
    x = x - basis @ (basis.transpose(1, 2) @ x)
    lost = x.norm(dim=1) <= 1e-10 * w.norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)  # [B, m]
    if bool(lost.any()):
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        noise = noise - basis @ (basis.transpose(1, 2) @ noise)
        x = torch.where(lost[:, None, :], noise, x)
    q = _orthonormalize(x)
    return _orthonormalize(q - basis @ (basis.transpose(1, 2) @ q))


def _krylov_block(
    ops: _Operators, v0: Tensor, n_check: int, n_iter: int, tol: float, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Block Krylov iteration from V0 [B, D, m]: basis [Q_0, Q_1, ...] with Q_{j+1} the part of
    J^T J Q_j outside the basis, Rayleigh-Ritz on the whole basis after every product.

    Returns the top ``n_check`` Ritz vectors [B, D, n_check], their eigenvalues and residuals
    [B, n_check], converged [B] and the number of products (blocks). A basis that reaches its
    cap (``KRYLOV_MAX_BLOCKS``) restarts from its ``n_check + m`` leading Ritz vectors, whose
    products are known (thick restart: the new block is still the part of the last products
    outside the old basis, where the residuals of those Ritz vectors lie); one that would
    outgrow D is filled up instead, and then the Ritz pairs are exact.
    """
    _, d, m = v0.shape
    cap = max(KRYLOV_MAX_BLOCKS * m, 2 * (n_check + m))
    q = _orthonormalize(v0)
    basis, images = q, None
    for it in range(1, n_iter + 1):
        w = ops.jtj(q)
        images = w if images is None else torch.cat([images, w], 2)
        v_r, lam, res = _ritz(basis, images)
        n = basis.shape[2]
        converged = (res[:, :n_check] <= tol * lam[:, :1]).all(dim=1) & (n >= n_check)
        if bool(converged.all()) or it == n_iter or n >= d:
            return v_r[:, :, :n_check], lam[:, :n_check], res[:, :n_check], converged, it
        q = _extend_basis(basis, w[:, :, : d - n], gen)  # a last, narrower block fills the space
        if n + q.shape[2] > cap:
            keep = n_check + m
            images = images @ (basis.transpose(1, 2) @ v_r[:, :, :keep])
            basis = v_r[:, :, :keep]
        basis = torch.cat([basis, q], 2)
    raise AssertionError("unreachable")


def jacobian_directions(
    model: Any,
    x_t: Tensor,
    timestep: int | float | Tensor,
    k: int,
    *,
    method: str = "subspace",
    mask: Tensor | None = None,
    n_iter: int = 100,
    tol: float = 1e-4,
    block_size: int | None = None,
    oversample: int = 0,
    init: Tensor | None = None,
    init_seed: int = 0,
    class_labels: int | Sequence[int] | Tensor | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    guidance_scale: float | None = None,
    branch: JacobianBranch = "guided",
    return_left: bool = False,
    chunk_size: int | None = None,
) -> JacobianResult:
    """Top-k right singular vectors and values of J_t = d eps / d h at x_t [B, *latent_shape].

    Args:
        model: an :class:`HSpaceModel` of any kind (h at its capture point) or a bare
            UNet2DModel (wrapped in one: h at the mid block).
        x_t: the denoiser's input (the latent of a latent model).
        timestep: the model timestep t of x_t (number, or tensor [] / [B]).
        k: number of singular vectors.
        method: ``"subspace"`` (Alg. 1, all k at once), ``"sequential"`` (Alg. 2, blocks of
            ``block_size`` vectors, each deflated against the ones found before; less memory) or
            ``"krylov"`` (block Krylov: blocks of ``block_size`` (default and at most k) +
            ``oversample`` vectors, Rayleigh-Ritz on all blocks so far; the fewest products at
            equal accuracy, at the cost of keeping the basis and its products: 2 x up to
            max(``KRYLOV_MAX_BLOCKS`` blocks, 2 (k + block)) float64 vectors of h per image).
        mask: mask M over eps's (H, W) ([H, W], [1, H, W], [B, H, W] or [B, 1, H, W]: the latent
            grid of a latent model); uses J of eps * M (eq. 9).
        n_iter: iteration limit per block (for ``"krylov"``: products of a block, i.e. blocks in
            the basis); tol: stop when every residual
            ||J^T J v - s^2 v|| <= tol * s_1^2 (relative to the largest eigenvalue of J^T J).
        oversample: extra vectors iterated with each block (not returned), which speeds up
            convergence when s_k and s_{k+1} are close.
        init: initial guess [k, C, H, W] or [B, k, C, H, W] (Alg. 2's Theta); random otherwise,
            drawn on the CPU from ``init_seed``.
        class_labels, prompt, negative_prompt, guidance_scale: the conditioning, one value or one
            per image, as the sampler takes it (guidance default: the model's, e.g. 7.5 for
            Stable Diffusion; 1 for unconditional models).
        branch: which output is differentiated under guidance. ``"guided"`` (the default) is
            the guided noise ``eps_u + g (eps_c - eps_u)`` with the same vector added to h in both
            branches, i.e. the noise an edit with ``Edit(branches="both")`` (the sampler's
            default) changes; ``"cond"`` / ``"uncond"``: that branch's own eps from its own h.
            Without guidance every branch is the one call.
        return_left: also return u = J v / s (one more batched JVP).
        chunk_size: tangents per vmapped JVP / VJP call; bounds the decoder's activation memory
            to ``chunk_size`` copies instead of k (+ oversample) at the cost of more calls.
            The model's dtype (e.g. bfloat16) is the dtype of the JVPs; the iteration is float64.

    The search needs no copy of the model's forward: :func:`split_denoiser` records the modules
    before h once and replays them, so each product recomputes only the part after h.
    """
    hmodel = as_hspace_model(model)
    _check_arguments(method, k, n_iter, tol, oversample, chunk_size)
    b = x_t.shape[0]
    request = jacobian_condition(
        hmodel, b, prompt=prompt, negative_prompt=negative_prompt, class_labels=class_labels,
        guidance_scale=guidance_scale, branch=branch,
    )  # fmt: skip
    # no_grad keeps autograd from recording the weights; the torch.func transforms still work inside.
    with torch.no_grad(), forward_ad_safe(hmodel.denoiser):
        condition = hmodel.conditioner.encode(request, b, hmodel.device, hmodel.dtype)
        split = split_denoiser(hmodel, x_t, timestep, condition, branch=branch)
        d = split.h[0].numel()
        if k > d:
            raise ValueError(f"k={k} exceeds the dimension of h ({d})")
        m = _broadcast_mask(mask, b, tuple(x_t.shape[-2:]), split.h)
        ops = _Operators(_masked_decoder(split, m), split.h.detach(), chunk_size)
        theta = _initial_vectors(init, init_seed, b, d, k, tuple(split.h.shape[1:]), split.h.device)
        blocks = _vector_blocks(method, k, block_size)
        if method == "krylov":
            v, lam, res, converged, block_iters = _krylov_directions(
                ops,
                theta,
                blocks[0][1],
                oversample=oversample,
                n_iter=n_iter,
                tol=tol,
                noise_seed=init_seed + 1,
            )
        else:
            v, lam, res, converged, block_iters = _iterate_blocks(
                ops, theta, blocks, oversample=oversample, n_iter=n_iter, tol=tol, noise_seed=init_seed + 1
            )
        s = lam.sqrt()
        vectors = v.permute(0, 2, 1).reshape(b, k, *split.h.shape[1:])
        left = _left_vectors(ops, v, s).to(split.h.dtype) if return_left else None

    ts = split.timesteps[:b].detach().cpu().tolist()
    meta = {
        "method": _METHOD_NAMES[method],
        "k": k,
        "n_iter": n_iter,
        "tol": tol,
        "oversample": oversample,
        "block_size": None if method == "subspace" else blocks[0][1] - blocks[0][0],
        "init_seed": None if init is not None else init_seed,
        "timestep": ts if len(set(ts)) > 1 else ts[0],
        "mask": _mask_info(mask),
        "capture": hmodel.capture.spec,
        "branch": branch,
        "guidance_scale": split.condition.guidance_scale if branch == "guided" else None,
        **_conditioning_info(request),
        "model_fingerprint": getattr(model, "fingerprint", None),
    }
    return JacobianResult(
        vectors=vectors.to(split.h.dtype),
        singular_values=s.to(torch.float32),
        residuals=res.to(torch.float32),
        converged=converged.cpu(),
        iterations=ops.applications,
        block_iterations=block_iters,
        left_vectors=left,
        meta=meta,
    )


def _conditioning_info(request: ConditionRequest) -> dict[str, Any]:
    """The prompts / class labels of a Jacobian, for its directions' provenance (absent if none)."""
    info = {
        "prompts": request.prompts,
        "negative_prompts": request.negative_prompts,
        "class_labels": request.class_labels,
    }
    return {key: value for key, value in info.items() if value is not None}


def _check_arguments(
    method: str, k: Any, n_iter: int, tol: float, oversample: int, chunk_size: int | None
) -> None:
    """The iteration settings of :func:`jacobian_directions`, checked before any model work."""
    if method not in _METHOD_NAMES:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHOD_NAMES))}, got {method!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if n_iter < 1 or not tol > 0:
        raise ValueError(f"n_iter must be >= 1 and tol > 0, got n_iter={n_iter}, tol={tol}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


_METHOD_NAMES = {
    "subspace": "alg1_subspace_iteration",
    "sequential": "alg2_sequential_subspace_iteration",
    "krylov": "block_krylov_iteration",
}


def _vector_blocks(method: str, k: int, block_size: int | None) -> list[tuple[int, int]]:
    """Column ranges iterated together: all k at once (Alg. 1), blocks of ``block_size`` (Alg. 2),
    or for the Krylov method the columns of its first block (``block_size``, default k)."""
    if method == "subspace":
        return [(0, k)]
    size = block_size if block_size is not None else (k if method == "krylov" else max(1, k // 4))
    if size < 1:
        raise ValueError(f"block_size must be >= 1, got {size}")
    if method == "krylov":
        return [(0, min(size, k))]
    return [(s, min(s + size, k)) for s in range(0, k, size)]


def _krylov_directions(
    ops: _Operators, theta: Tensor, size: int, *, oversample: int, n_iter: int, tol: float, noise_seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """Top-k Ritz pairs of a block Krylov basis grown from ``size`` columns of Theta [B, D, k] plus
    ``oversample`` random ones; returns as :func:`_iterate_blocks` does."""
    b, d, k = theta.shape
    gen = torch.Generator().manual_seed(noise_seed)
    extra = min(oversample, d - size)
    v0 = theta[:, :, :size]
    if extra:
        v0 = torch.cat([v0, torch.randn(b, d, extra, generator=gen, dtype=torch.float64).to(v0.device)], 2)
    if n_iter * v0.shape[2] < k:
        raise ValueError(f"n_iter={n_iter} blocks of {v0.shape[2]} vectors cannot hold k={k} vectors")
    v, lam, res, converged, iters = _krylov_block(ops, v0, k, n_iter, tol, gen)
    return v, lam, res, converged, [iters]


def _iterate_blocks(
    ops: _Operators,
    theta: Tensor,
    blocks: list[tuple[int, int]],
    *,
    oversample: int,
    n_iter: int,
    tol: float,
    noise_seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """Subspace iteration block by block, each deflated against the vectors found before.

    Returns vectors [B, D, k], eigenvalues of J^T J [B, k] and residuals [B, k] sorted by
    decreasing eigenvalue, converged [B] and the iterations each block took.
    """
    b, d, _ = theta.shape
    found_v, found_lam, found_res, block_iters = [], [], [], []
    converged = torch.ones(b, dtype=torch.bool, device=theta.device)
    scale: Tensor | None = None
    gen = torch.Generator().manual_seed(noise_seed)
    for start, end in blocks:
        width = end - start
        extra = min(oversample, d - end)
        v0 = theta[:, :, start:end]
        if extra:
            noise = torch.randn(b, d, extra, generator=gen, dtype=torch.float64).to(v0.device)
            v0 = torch.cat([v0, noise], 2)
        deflate = torch.cat(found_v, 2) if found_v else None
        v, lam, res, conv, iters = _subspace_block(ops, v0, width, n_iter, tol, scale, deflate)
        found_v.append(v[:, :, :width])
        found_lam.append(lam[:, :width])
        found_res.append(res[:, :width])
        block_iters.append(iters)
        converged &= conv
        scale = lam[:, 0] if scale is None else torch.maximum(scale, lam[:, 0])
    v, lam, res = torch.cat(found_v, 2), torch.cat(found_lam, 1), torch.cat(found_res, 1)
    order = lam.argsort(dim=1, descending=True)
    v = v.gather(2, order[:, None, :].expand_as(v))
    return v, lam.gather(1, order), res.gather(1, order), converged, block_iters


def _left_vectors(ops: _Operators, v: Tensor, s: Tensor) -> Tensor:
    """u = J v / s for vectors v [B, D, k] and singular values s [B, k]: [B, k, *out] float64."""
    b, _, k = v.shape
    u = ops.jv(v).to(torch.float64)  # [k, B, *out]
    u = u / s.T.reshape(k, b, *([1] * (u.ndim - 2))).clamp_min(torch.finfo(torch.float64).tiny)
    return u.transpose(0, 1)


def _initial_vectors(
    init: Tensor | None, seed: int, b: int, d: int, k: int, h_shape: tuple[int, ...], device: torch.device
) -> Tensor:
    """Theta [B, D, k] in float64: the given guess or i.i.d. Gaussian from ``seed`` (CPU generator)."""
    if init is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, d, k, generator=g, dtype=torch.float64).to(device)
    t = torch.as_tensor(init)
    if t.ndim == 4:
        t = t[None].expand(b, *t.shape)
    if t.ndim != 5 or t.shape[0] != b or t.shape[1] != k or tuple(t.shape[2:]) != h_shape:
        raise ValueError(
            f"init must be [k, C, H, W] or [B, k, C, H, W] = [{b}, {k}, {h_shape}], got {tuple(t.shape)}"
        )
    return t.reshape(b, k, d).transpose(1, 2).to(device=device, dtype=torch.float64)
