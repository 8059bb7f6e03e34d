"""Seeded DDPM/DDIM sampling that records h-space, applies edits and swaps h between samples.

The sampler is one readable loop over a diffusers scheduler, like ``DDPMPipeline`` and
``DDIMPipeline``: every sample's x_T and every z_t come from its own
``torch.Generator().manual_seed(seed)`` through diffusers' ``randn_tensor`` with a list of
generators, so a sample does not depend on the batch it is rendered in, and with the same
generators the loop reproduces the pipelines' images.

Paper references: the update x_{t-1} = sqrt(a_{t-1}) P_t + D_t + sigma_t z_t (eq. 2-5); an edit
adds gamma * v_t to h_t (Sec. III). Mode ``both`` (the paper's default) feeds the edited h to
P_t and D_t in one U-Net pass; mode ``asyrp`` (Kwon et al.) uses it in P_t only and an unedited
second pass for D_t. The h-swap of Fig. 2a renders one seed with another seed's h_{T:1}.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from hspace.conditioning import Condition, ConditionRequest, cycle
from hspace.directions import Direction
from hspace.model import SCHEDULERS, HSpaceModel

if TYPE_CHECKING:
    from PIL import Image

EditMode = Literal["both", "asyrp"]
EditUnits = Literal["raw", "sigma"]
#: Under classifier-free guidance: which branches an edit enters.
EditBranches = Literal["both", "cond", "uncond"]
EDIT_BRANCHES = ("both", "cond", "uncond")
#: Under classifier-free guidance: whose h a sampler records ("both": h = cond, h_uncond = uncond).
RecordBranch = Literal["uncond", "cond", "both"]
RECORD_BRANCHES = ("uncond", "cond", "both")
#: The paper's code records h from the unconditional call; so does the sampler unless told otherwise.
DEFAULT_RECORD_BRANCH: RecordBranch = "uncond"
Steps = int | Iterable[int] | slice | None


# ---------------------------------------------------------------------------------------------
# results and edits
@dataclass
class Trajectory:
    """The result of a sampling run; row b belongs to ``seeds[b]``.

    images [B, C, H, W] float32 in [0, 1] (decoded by the VAE for latent models); x_T
    [B, *latent_shape] float32 the start noise (times the scheduler's ``init_noise_sigma``);
    timesteps [T] in sampling order (step 0 is the noisiest); h [B, T, C, H, W] at the capture
    point (the h the rest of the network saw, i.e. after an edit or swap; under guidance the
    ``record_branch``'s, the conditional one when both were recorded) or None; h_uncond the
    unconditional branch's h when ``record_branch="both"``; x_t [B, T, *latent_shape] the denoiser
    input at each step (``record_x``); mid_input [B, T, C', H', W'] the capture module's input at
    each step (``record_mid_input``). prompts, negative_prompts, class_labels: per sample, as used.
    """

    images: Tensor
    x_T: Tensor
    timesteps: Tensor
    seeds: list[int]
    h: Tensor | None = None
    x_t: Tensor | None = None
    mid_input: Tensor | None = None
    h_uncond: Tensor | None = None
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    class_labels: list[int] | None = None
    guidance_scale: float = 1.0
    record_branch: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to_pil(self) -> list[Image.Image]:
        """The images as 8-bit RGB PIL images (rounded like diffusers' ``numpy_to_pil``)."""
        from PIL import Image

        arrays = (self.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


@dataclass
class Edit:
    """An h-space edit: h_t <- h_t + sum_d scale[b, d] * v_{d,t} at the chosen steps.

    directions: one Direction or several (their deltas add up).
    scales: a float (every row and direction); a 1-D sequence with one entry per direction, or,
        for a single direction, one entry per row (length B); or a [B, D] tensor (per row and
        direction).
    steps: step indices (0 = noisiest) where the edit is applied; None = all steps.
    mode: "both" (edited h in P_t and D_t, one pass) or "asyrp" (P_t only, two passes, paper
        eq. 2-5; with scale 0 it equals plain DDIM, and plain DDPM when x0 is not clipped: eq. 2-5
        clip P_t but keep the unclipped eps in D_t, where DDPMScheduler uses the clipped x0 twice).
    units: "raw" (gamma * v_t as stored) or "sigma" (gamma * sigma_t * v_t / ||v_t||).
    branches: under classifier-free guidance, the branches whose h is edited: "both" (the
        default, as the paper's code does), "cond" or "uncond". Without guidance there is one.
    """

    directions: Direction | Sequence[Direction]
    scales: float | Sequence[float] | Tensor = 1.0
    steps: Steps = None
    mode: EditMode = "both"
    units: EditUnits = "raw"
    branches: EditBranches = "both"
    _directions: list[Direction] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.branches not in EDIT_BRANCHES:
            raise ValueError(f"Edit.branches must be one of {EDIT_BRANCHES}, got {self.branches!r}")
        if self.mode not in ("both", "asyrp"):
            raise ValueError(f"Edit.mode must be 'both' or 'asyrp', got {self.mode!r}")
        if self.units not in ("raw", "sigma"):
            raise ValueError(f"Edit.units must be 'raw' or 'sigma', got {self.units!r}")
        dirs = _as_directions(self.directions, "Edit.directions")
        if not dirs:
            raise ValueError("Edit.directions is empty")
        _validate_scales(self.scales, "Edit.scales")
        self._directions = dirs

    @property
    def direction_list(self) -> list[Direction]:
        return list(self._directions)


@dataclass
class _EditPlan:
    """An Edit resolved against a sampler: raw vectors on the device and per-row scales."""

    vectors: Tensor  # [D, T, C, H, W] float32, raw h units
    scales: Tensor  # [N, D] float32
    active: list[bool]  # [T]
    mode: EditMode
    branches: EditBranches = "both"

    def delta(self, step: int, rows: slice) -> Tensor | None:
        """sum_d scale[n, d] * v_{d, step} for the rows, or None where the step is not edited."""
        if not self.active[step]:
            return None
        return torch.einsum("nd,dchw->nchw", self.scales[rows], self.vectors[:, step])


# ---------------------------------------------------------------------------------------------
# validation helpers
#: Seeds are 0 <= seed < 2**63: torch.Generator.manual_seed wraps negative seeds (-1 is 2**64 - 1),
#: and seeds are stored as int64.
MAX_SEED = 2**63 - 1


def _exact_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer type (numpy ints too), else None (bools, floats, strings)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _validate_seed(seed: Any, what: str = "seeds") -> int:
    """``seed`` as an int in 0..MAX_SEED; ValueError naming the value otherwise (bools are not seeds)."""
    value = _exact_int(seed)
    if value is None:
        raise ValueError(f"{what} must be ints, got {seed!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{what}: seed {value} is out of range 0..2**63-1")
    return value


def _validate_num_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """``num_inference_steps`` as an int in 1..num_train_timesteps (no floats, strings or bools)."""
    steps = _exact_int(num_inference_steps)
    if steps is None:
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {steps}")
    return steps


def _validate_eta(eta: Any, sampler: str) -> float:
    """DDIM eta as a finite float in [0, 1] (above 1 the DDIM update takes the root of a negative
    number); ``sampler='ddpm'`` has eta = 1; the other samplers take none. None gives the
    sampler's default."""
    if eta is None:
        return 1.0 if sampler == "ddpm" else 0.0
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"eta applies to the ddim sampler only; sampler={sampler!r} takes none")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number in [0, 1], got {eta!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if sampler == "ddpm" and eta != 1:
        raise ValueError(f"sampler='ddpm' has eta=1; for eta={eta} use sampler='ddim' with eta={eta}")
    return float(eta)


def _validate_scales(scales: Any, what: str) -> Tensor:
    """Edit scales as a float32 CPU tensor; ValueError naming a non-numeric or non-finite value."""
    try:
        if isinstance(scales, str):
            raise TypeError
        s = torch.as_tensor(scales, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be numbers, got {scales!r}") from None
    if not bool(torch.isfinite(s).all()):
        bad = s[~torch.isfinite(s)].flatten()[0].item()
        raise ValueError(f"{what} must be finite, got {bad} in {scales!r}")
    return s


def _validate_finite(t: Tensor, what: str) -> None:
    """ValueError unless every value of ``t`` is finite (NaN or inf would give all-NaN images)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} has non-finite values (NaN or inf)")


def resolve_steps(steps: Steps, num_steps: int, what: str = "steps") -> list[bool]:
    """A [T] mask from step indices (0 = noisiest), a slice, or None (all); out of range raises."""
    if steps is None:
        return [True] * num_steps
    if isinstance(steps, slice):
        indices: list[int] = list(range(num_steps))[steps]
    else:
        try:
            indices = [
                _step_index(i, what) for i in ([steps] if isinstance(steps, numbers.Integral) else steps)
            ]
        except TypeError:
            raise ValueError(f"{what} must be step indices (ints), a slice or None, got {steps!r}") from None
    mask = [False] * num_steps
    for i in indices:
        if not 0 <= i < num_steps:
            raise ValueError(f"{what}: step {i} out of range 0..{num_steps - 1} (0 is the noisiest step)")
        mask[i] = True
    return mask


def _step_index(i: Any, what: str) -> int:
    """One step index: an int, not a bool or a float (2.5 would silently become 2)."""
    if isinstance(i, bool):
        raise ValueError(f"{what}: {i!r} is not a step index")
    try:
        return operator.index(i)
    except TypeError:
        raise ValueError(f"{what}: {i!r} is not a step index (an int)") from None


def check_direction(direction: Direction, model: HSpaceModel, timesteps: Tensor) -> None:
    """Raise ValueError naming what does not match: capture point and h shape, number of steps,
    timesteps, fingerprint."""
    direction.check_compatible(model.h_shape, timesteps, model.fingerprint, capture=model.capture.spec)


def _as_directions(directions: Direction | Sequence[Direction], what: str) -> list[Direction]:
    """One direction or several as a list; TypeError naming ``what`` for anything but Directions."""
    dirs = [directions] if isinstance(directions, Direction) else list(directions)
    for d in dirs:
        if not isinstance(d, Direction):
            raise TypeError(f"{what} must be hspace.Direction objects, got {type(d).__name__}")
    return dirs


def _scales_matrix(scales: float | Sequence[float] | Tensor, n_rows: int, n_dirs: int) -> Tensor:
    """Scales as [N, D] float32 (see :class:`Edit` for the accepted forms)."""
    s = _validate_scales(scales, "Edit.scales")
    if s.ndim == 0:
        return s.expand(n_rows, n_dirs).clone()
    if s.ndim == 1:
        if n_dirs == 1 and s.numel() in (1, n_rows):
            return s.reshape(-1, 1).expand(n_rows, 1).clone()
        if s.numel() == n_dirs:
            return s.reshape(1, -1).expand(n_rows, n_dirs).clone()
        raise ValueError(
            f"Edit.scales has {s.numel()} entries: give one per direction ({n_dirs}), "
            f"or for one direction one per row ({n_rows}), or a [{n_rows}, {n_dirs}] tensor"
        )
    if s.ndim == 2 and s.shape[1] == n_dirs and s.shape[0] in (1, n_rows):
        return s.expand(n_rows, n_dirs).clone()
    raise ValueError(
        f"Edit.scales has shape {tuple(s.shape)}, expected a float, [D], [N] or [{n_rows}, {n_dirs}]"
    )


def _progress(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------------
# the sampler
class HSpaceSampler:
    """Seeded sampler over an :class:`HSpaceModel` of any kind that records h at its capture point.

    sampler: ``ddpm`` (eta = 1, the default), ``ddim`` (``eta``, default 0), or one of the samplers
    Stable Diffusion users run: ``dpm`` (DPMSolverMultistepScheduler), ``euler``
    (EulerDiscreteScheduler), ``euler_a`` (EulerAncestralDiscreteScheduler); every one is built
    from the model's scheduler config and stepped by its own ``scheduler.step``, with each sample's
    noise from its own generator. ``clip_sample`` overrides the scheduler config's x0 clipping
    (None keeps it; DDIM inversion reconstructs with False).
    """

    def __init__(
        self,
        model: HSpaceModel,
        *,
        sampler: str = "ddpm",
        num_inference_steps: int = 50,
        eta: float | None = None,
        clip_sample: bool | None = None,
    ) -> None:
        if sampler not in SCHEDULERS:
            raise ValueError(f"sampler must be one of {', '.join(SCHEDULERS)}, got {sampler!r}")
        self.eta = _validate_eta(eta, sampler)
        self.num_inference_steps = _validate_num_steps(num_inference_steps, model.num_train_timesteps)
        self.model = model
        self.sampler = sampler
        self.clip_sample = clip_sample
        self.timesteps = self.make_scheduler().timesteps.clone()

    @property
    def num_steps(self) -> int:
        return int(len(self.timesteps))

    def make_scheduler(self):
        """A fresh scheduler with its timesteps set (no state is shared between runs)."""
        overrides = {} if self.clip_sample is None else {"clip_sample": self.clip_sample}
        scheduler = self.model.make_scheduler(self.sampler, **overrides)
        scheduler.set_timesteps(self.num_inference_steps)
        return scheduler

    # -- public API ---------------------------------------------------------------------------
    def sample(
        self,
        seeds: Sequence[int] | int | None = None,
        *,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        class_labels: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        record_branch: RecordBranch = DEFAULT_RECORD_BRANCH,
        edit: Edit | None = None,
        record_h: bool = True,
        record_x: bool = False,
        record_mid_input: bool = False,
        h_replace: Tensor | Trajectory | None = None,
        h_replace_steps: Steps = None,
        x_T: Tensor | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        h_dtype: torch.dtype | None = None,
    ) -> Trajectory:
        """Render one sample per seed, recording h at every step; see :class:`Trajectory`.

        prompt / negative_prompt (text models), class_labels (class-conditional models): one value
        for every seed, or a list cycled over the seeds. guidance_scale: classifier-free guidance
        (default: the model's, e.g. 7.5 for Stable Diffusion, 1 = none for unconditional models).
        record_branch: under guidance, whose h is recorded: ``uncond`` (the default, as the
        paper's code), ``cond``, or ``both`` (``h`` = cond, ``h_uncond`` = uncond).
        edit: an :class:`Edit` applied at its steps (to the branches it names). h_replace:
        [B, T, C, H, W] h to use instead of the model's at ``h_replace_steps`` (None = all) in
        every branch, or a Trajectory recorded with ``record_branch="both"`` (each branch gets its
        own). x_T: [B, *latent_shape] start noise instead of the seed's (the seed's x_T is still
        drawn and discarded, so z_t stay the seed's). batch_size: samples per denoiser batch
        (results do not depend on it; default: see :func:`resolve_batch_size`). h_dtype: storage
        dtype of h (default the model's; torch.float16 halves the memory).
        """
        model, num_steps = self.model, self.num_steps
        seeds = self._seed_list(seeds, x_T)
        n = len(seeds)
        request = self._request(n, prompt, negative_prompt, class_labels, guidance_scale)
        if record_branch not in RECORD_BRANCHES:
            raise ValueError(f"record_branch must be one of {RECORD_BRANCHES}, got {record_branch!r}")
        plan = self._plan(edit, n) if edit is not None else None
        replacement = self._replacement(h_replace, h_replace_steps, n)
        if x_T is not None and tuple(x_T.shape) != (n, *model.latent_shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {(n, *model.latent_shape)}")
        if x_T is not None:
            _validate_finite(x_T, "x_T")
        batch_size = resolve_batch_size(batch_size, n, model.device)
        guided = request.guidance_scale > 1 and model.conditioner.supports_guidance

        pin = model.device.type == "cuda"
        h_dtype = h_dtype or model.dtype

        def buffer(shape: tuple[int, ...], dtype: torch.dtype, wanted: bool) -> Tensor | None:
            return _buffer((n, num_steps, *shape), dtype, pin) if wanted else None

        out = Trajectory(
            images=torch.empty(n, *model.image_shape),
            x_T=torch.empty(n, *model.latent_shape),
            timesteps=self.timesteps.clone(),
            seeds=seeds,
            h=buffer(model.h_shape, h_dtype, record_h),
            x_t=buffer(model.latent_shape, torch.float32, record_x),
            mid_input=buffer(model.mid_input_shape, h_dtype, record_mid_input),
            h_uncond=buffer(model.h_shape, h_dtype, record_h and guided and record_branch == "both"),
            prompts=request.prompts,
            negative_prompts=request.negative_prompts,
            class_labels=request.class_labels,
            guidance_scale=request.guidance_scale,
            record_branch=record_branch if guided else None,
        )
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            self._run(rows, out, request.rows(rows), plan, replacement, x_T, progress)
        if pin:
            torch.cuda.synchronize(model.device)
        return out

    def sample_edits(
        self,
        seeds: Sequence[int],
        edit_directions: Direction | Sequence[Direction],
        scales: Sequence[float] | Tensor,
        *,
        mode: EditMode = "both",
        units: EditUnits = "raw",
        steps: Steps = None,
        branches: EditBranches = "both",
        batch_size: int | None = None,
        progress: bool = False,
        **conditioning: Any,
    ) -> Tensor:
        """Render every seed at every scale in one batch: images [B, S, C, H, W].

        scales: [S] (the same scale for every direction) or [S, D]. Row (b, s) uses seed b, so
        column s=j with scale 0 is the unedited sample. ``conditioning``: ``prompt``,
        ``negative_prompt``, ``class_labels`` (per seed, or one for all) and ``guidance_scale``.
        """
        seeds = self._seed_list(seeds, None)
        dirs = _as_directions(edit_directions, "edit_directions")
        s = _validate_scales(scales, "scales")
        s = s.reshape(-1, 1).expand(-1, len(dirs)) if s.ndim <= 1 else s
        if s.ndim != 2 or s.shape[1] != len(dirs):
            raise ValueError(f"scales must be [S] or [S, {len(dirs)}], got shape {tuple(s.shape)}")
        n_seeds, n_scales = len(seeds), s.shape[0]
        row_seeds = [seed for seed in seeds for _ in range(n_scales)]
        row_scales = s.repeat(n_seeds, 1)  # row b*S + j has scale j
        for key in ("prompt", "negative_prompt", "class_labels"):
            if conditioning.get(key) is not None:
                per_seed = cycle(conditioning[key], n_seeds, key)
                conditioning[key] = [v for v in per_seed for _ in range(n_scales)]  # type: ignore[union-attr]
        edit = Edit(dirs, scales=row_scales, steps=steps, mode=mode, units=units, branches=branches)
        traj = self.sample(
            row_seeds, edit=edit, record_h=False, batch_size=batch_size, progress=progress, **conditioning
        )
        return traj.images.view(n_seeds, n_scales, *self.model.image_shape)

    def h_swap(
        self,
        seeds_a: Sequence[int],
        seeds_b: Sequence[int],
        steps: Steps = None,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        **conditioning: Any,
    ) -> Trajectory:
        """Render seeds_a with h taken from seeds_b at ``steps`` (None = h_{T:1}, paper Fig. 2a).

        Under guidance each branch gets the donor's h of the same branch. ``conditioning`` (prompt,
        negative_prompt, class_labels, guidance_scale) applies to both renders.
        """
        seeds_a, seeds_b = self._seed_list(seeds_a, None), self._seed_list(seeds_b, None)
        if len(seeds_a) != len(seeds_b):
            raise ValueError(f"seeds_a has {len(seeds_a)} seeds but seeds_b has {len(seeds_b)}")
        donor = self.sample(
            seeds_b, batch_size=batch_size, progress=progress, record_branch="both", **conditioning
        )
        return self.sample(
            seeds_a, h_replace=donor, h_replace_steps=steps, batch_size=batch_size, progress=progress,
            **conditioning,
        )  # fmt: skip

    # -- the loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def _run(
        self,
        rows: slice,
        out: Trajectory,
        request: ConditionRequest,
        plan: _EditPlan | None,
        replacement: _Replacement | None,
        x_T: Tensor | None,
        progress: bool,
    ) -> None:
        """One batch: the pipelines' loop, with the hook capturing / editing / replacing h."""
        model = self.model
        device, dtype = model.device, model.dtype
        from diffusers.utils.torch_utils import randn_tensor

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in out.seeds[rows]]
        scheduler = self.make_scheduler()
        n = len(generators)
        cond = model.conditioner.encode(request, n, device, dtype)
        # x_t and the scheduler arithmetic stay in float32 for half-precision models; only the
        # denoiser runs in the model's dtype
        state_dtype = _state_dtype(dtype)
        x = randn_tensor((n, *model.latent_shape), generator=generators, device=device, dtype=state_dtype)
        x = x * scheduler.init_noise_sigma
        if x_T is not None:
            x = x_T[rows].to(device=device, dtype=state_dtype)
        out.x_T[rows] = x.float().cpu()
        asyrp = plan is not None and plan.mode == "asyrp"
        step_kwargs = _step_kwargs(scheduler, self.eta, generators)

        with model.hooks(capture_h=out.h is not None, capture_input=out.mid_input is not None) as hook:
            for i, t in enumerate(_progress(scheduler.timesteps, progress, f"{self.sampler} sampling")):
                if out.x_t is not None:
                    out.x_t[rows, i].copy_(x, non_blocking=True)
                x_in = scheduler.scale_model_input(cond.model_input(x), t).to(dtype)
                hook.replace = replacement.at(i, rows, cond) if replacement is not None else None
                delta = plan.delta(i, rows) if plan is not None else None
                hook.delta = _spread(delta, cond, plan.branches) if delta is not None else None  # type: ignore[union-attr]
                eps = cond.guide(model.predict(x_in, t, cond)).to(x.dtype)
                self._record(out, rows, i, hook, cond)
                if asyrp and delta is not None:
                    hook.delta = None
                    eps_plain = cond.guide(model.predict(x_in, t, cond)).to(x.dtype)
                    x = self._asyrp_step(scheduler, eps, eps_plain, t, x, generators)
                else:
                    x = scheduler.step(eps, t, x, **step_kwargs).prev_sample

        out.images[rows] = model.decode(x).cpu()

    @staticmethod
    def _record(out: Trajectory, rows: slice, step: int, hook: Any, cond: Condition) -> None:
        """One copy per step into the preallocated host buffers, from the recorded branch's rows."""
        branch = out.record_branch or "cond"
        if out.h is not None:
            main = "cond" if branch == "both" else branch
            out.h[rows, step].copy_(hook.h[cond.branch_rows(main)], non_blocking=True)  # type: ignore[arg-type]
        if out.h_uncond is not None:
            out.h_uncond[rows, step].copy_(hook.h[cond.branch_rows("uncond")], non_blocking=True)
        if out.mid_input is not None:
            main = "uncond" if branch == "uncond" else "cond"
            out.mid_input[rows, step].copy_(hook.mid_input[cond.branch_rows(main)], non_blocking=True)

    def _asyrp_step(
        self, scheduler: Any, eps_p: Tensor, eps_d: Tensor, t: Tensor, x: Tensor, generators: list
    ) -> Tensor:
        """Paper eq. 2-5 with P_t from the edited eps and D_t from the unedited one.

        ``eps_p`` and ``eps_d`` are the denoiser's (guided) outputs; a v- or sample-prediction
        model's are turned into the noise they imply at ``x`` first.

        x_{t-1} = sqrt(a_{t-1}) P_t(eps_p) + sqrt(1 - a_{t-1} - sigma_t^2) eps_d + sigma_t z_t,
        sigma_t = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1}), a = alphas_cumprod.
        z_t is drawn exactly when the scheduler would draw it, from the same generators. Under
        guidance both eps are the guided ones.
        """
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"asyrp edits need sampler 'ddpm' or 'ddim' (eq. 2-5), got {self.sampler!r}")
        config = scheduler.config
        if getattr(config, "thresholding", False):
            raise ValueError("asyrp edits do not support a scheduler with thresholding=True")
        alpha_prod_t = scheduler.alphas_cumprod[t]
        eps_p = epsilon_from_prediction(eps_p, x, alpha_prod_t, config.prediction_type)
        eps_d = epsilon_from_prediction(eps_d, x, alpha_prod_t, config.prediction_type)
        alpha_prod_t_prev = _alpha_prod_prev(scheduler, t)
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (x - beta_prod_t ** (0.5) * eps_p) / alpha_prod_t ** (0.5)  # P_t, eq. 3
        if config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -config.clip_sample_range, config.clip_sample_range
            )
        variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance ** (0.5)  # sigma_t, eq. 5
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps_d  # D_t, eq. 4
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        draws = (int(t) > 0) if self.sampler == "ddpm" else (self.eta > 0)
        if draws:
            from diffusers.utils.torch_utils import randn_tensor

            z = randn_tensor(eps_d.shape, generator=generators, device=eps_d.device, dtype=eps_d.dtype)
            prev_sample = prev_sample + std_dev_t * z
        return prev_sample

    # -- input handling -----------------------------------------------------------------------
    def _request(
        self,
        n: int,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None,
        class_labels: int | Sequence[int] | None,
        guidance_scale: float | None,
    ) -> ConditionRequest:
        """The conditioning for n samples, checked against what the model takes."""
        conditioner = self.model.conditioner
        request = ConditionRequest(
            prompts=cycle(prompt, n, "prompt"),
            negative_prompts=cycle(negative_prompt, n, "negative_prompt"),
            class_labels=cycle(class_labels, n, "class_labels"),
        )
        conditioner.check(request)
        request.guidance_scale = conditioner.resolve_guidance(guidance_scale)
        return request

    @staticmethod
    def _seed_list(seeds: Sequence[int] | int | None, x_T: Tensor | None) -> list[int]:
        if seeds is None:
            if x_T is None:
                raise ValueError("give seeds (a list of ints), or x_T")
            return list(range(int(x_T.shape[0])))
        if isinstance(seeds, (bool, str, bytes)):
            seeds = [seeds]  # type: ignore[list-item]
        else:
            with contextlib.suppress(TypeError):
                seeds = [operator.index(seeds)]  # one seed
        try:
            out = [_validate_seed(s) for s in seeds]
        except TypeError:
            raise ValueError(f"seeds must be a list of ints, got {seeds!r}") from None
        if not out:
            raise ValueError("seeds is empty")
        return out

    def _plan(self, edit: Edit, n_rows: int) -> _EditPlan:
        if not isinstance(edit, Edit):
            raise ValueError(f"edit must be an hspace.Edit, got {type(edit).__name__}")
        model, num_steps = self.model, self.num_steps
        dirs = edit.direction_list
        for d in dirs:
            check_direction(d, model, self.timesteps)
        vectors = torch.stack([d.in_units(edit.units, num_steps) for d in dirs])
        for d, v in zip(dirs, vectors, strict=True):
            _validate_finite(v, f"direction {d.name!r} in {edit.units} units")
        vectors = vectors.to(model.device)
        scales = _scales_matrix(edit.scales, n_rows, len(dirs)).to(model.device)
        active = resolve_steps(edit.steps, num_steps, "Edit.steps")
        return _EditPlan(
            vectors=vectors, scales=scales, active=active, mode=edit.mode, branches=edit.branches
        )

    def _replacement(
        self, h_replace: Tensor | Trajectory | None, steps: Steps, n_rows: int
    ) -> _Replacement | None:
        mask = resolve_steps(steps, self.num_steps, "h_replace_steps")
        if h_replace is None:
            return None
        uncond = None
        if isinstance(h_replace, Trajectory):
            if h_replace.h is None:
                raise ValueError("h_replace trajectory has no h (it was sampled with record_h=False)")
            h_replace, uncond = h_replace.h, h_replace.h_uncond
        want = (n_rows, self.num_steps, *self.model.h_shape)
        for h in (h_replace, uncond):
            if h is not None and tuple(h.shape) != want:
                raise ValueError(f"h_replace has shape {tuple(h.shape)}, expected {want}")
            if h is not None:
                _validate_finite(h, "h_replace")
        return _Replacement(cond=h_replace, uncond=uncond, active=mask)


@dataclass
class _Replacement:
    """h to put in place of the model's: per branch (``uncond`` None = the same h in both)."""

    cond: Tensor
    uncond: Tensor | None
    active: list[bool]

    def at(self, step: int, rows: slice, cond: Condition) -> Tensor | None:
        """The call batch's replacement at ``step``, laid out like the call's branches."""
        if not self.active[step]:
            return None
        h = self.cond[rows, step]
        if not cond.guided:
            return h
        h_uncond = self.uncond[rows, step] if self.uncond is not None else h
        return torch.cat([h_uncond, h]) if cond.uncond_first else torch.cat([h, h_uncond])


def _spread(delta: Tensor, cond: Condition, branches: EditBranches) -> Tensor:
    """An edit's per-sample delta laid out over the call batch: in the branches it enters, 0 elsewhere."""
    if not cond.guided:
        return delta
    zero = torch.zeros_like(delta)
    first, second = ("uncond", "cond") if cond.uncond_first else ("cond", "uncond")
    parts = [delta if branches in ("both", b) else zero for b in (first, second)]
    return torch.cat(parts)


def _step_kwargs(scheduler: Any, eta: float, generators: list) -> dict[str, Any]:
    """``eta`` and ``generator`` for ``scheduler.step`` where it takes them, as the pipelines'
    ``prepare_extra_step_kwargs`` does (one generator per sample: per-sample noise)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def _state_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of x_t and the scheduler update: float32 unless the model is float64."""
    return model_dtype if model_dtype == torch.float64 else torch.float32


def epsilon_from_prediction(output: Tensor, x: Tensor, alpha_prod: Tensor, prediction_type: str) -> Tensor:
    """The noise a denoiser's ``output`` implies at ``x`` of noise level ``alpha_prod`` (alphas_cumprod).

    ``prediction_type`` is the scheduler's: ``epsilon`` (returned as it is), ``v_prediction``
    (v = sqrt(a) eps - sqrt(1 - a) x_0) or ``sample`` (x_0).
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_prod**0.5 * output + (1 - alpha_prod) ** 0.5 * x
    if prediction_type == "sample":
        return (x - alpha_prod**0.5 * output) / (1 - alpha_prod) ** 0.5
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction, sample)")


def _alpha_prod_prev(scheduler: Any, t: Tensor) -> Tensor:
    """alphas_cumprod at the step after t, as the scheduler itself defines it."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, DDIMScheduler):
        prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    prev = int(scheduler.previous_timestep(t))
    return scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.one


#: Rows per U-Net call on the CPU when the caller names none. Small batches keep the activations
#: in cache: the toy U-Net renders ~2x more images per second at 16 rows than at 256
#: (``make bench``, throughput table).
CPU_DEFAULT_BATCH_SIZE = 16


#: Rows per U-Net call on an accelerator when the caller names none: the CelebA-HQ-256 U-Net's
#: activations at 64 rows fit a 24 GB card in float32, and larger batches gain little on an H100.
GPU_DEFAULT_BATCH_SIZE = 64


def resolve_batch_size(batch_size: int | None, n_rows: int, device: torch.device) -> int:
    """``batch_size``, or the device's default: at most :data:`GPU_DEFAULT_BATCH_SIZE` rows on an
    accelerator, at most :data:`CPU_DEFAULT_BATCH_SIZE` rows on the CPU."""
    if batch_size is None:
        cap = CPU_DEFAULT_BATCH_SIZE if device.type == "cpu" else GPU_DEFAULT_BATCH_SIZE
        return max(1, min(n_rows, cap))
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> Tensor:
    """A preallocated host buffer (pinned when the model is on CUDA, for async copies)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)
