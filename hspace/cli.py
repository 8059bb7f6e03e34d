"""The ``hspace`` command: sample, edit, swap and invert in h-space; inspect, diff and clean catalogs.

Commands load what they need when they run (torch models, the catalog, and Ray and the pipeline
only for ``build``), so ``hspace --help`` works without the pipeline extras installed. Expected
errors (bad input, missing files, a corrupt catalog) print one ``Error:`` line and exit non-zero,
2 for bad input; tracebacks are for bugs. Output images are local PNG files; models, direction
files and catalogs are paths or fsspec URLs (``--storage-options`` takes their JSON options).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from torch import Tensor

    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler

app = typer.Typer(
    name="hspace",
    help="Interpretable directions in the h-space of diffusion models (Haas et al. 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
catalog_app = typer.Typer(
    help="Inspect, compare and clean a direction catalog.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(catalog_app, name="catalog")

#: Pixels of background around and between the cells of every image grid the CLI writes.
GRID_PAD = 2
#: Every cell of a written grid is upscaled (nearest neighbour) to at least this many pixels.
MIN_CELL = 128
#: PNG text key holding the grid layout as JSON (cell size, padding, label margins, labels).
GRID_KEY = "hspace:grid"
#: The most seeds/steps one list may expand to (a typo like 0-10000000 fails fast instead).
MAX_LIST = 100_000

F = TypeVar("F", bound=Callable[..., Any])


class SamplerKind(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    dpm = "dpm"
    euler = "euler"
    euler_a = "euler_a"


class EditBranchesOpt(str, Enum):
    both = "both"
    cond = "cond"
    uncond = "uncond"


class Units(str, Enum):
    raw = "raw"
    sigma = "sigma"


class Mode(str, Enum):
    both = "both"
    asyrp = "asyrp"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# ---------------------------------------------------------------------------------------------
# errors for users
class UsageError(ValueError):
    """Bad command-line input detected by the CLI itself (exit status 2)."""


def _exit_code(error: BaseException) -> int | None:
    """Exit status for an expected error, None for a bug (which keeps its traceback).

    A damaged catalog or run (checksum, ref conflict, corrupt shard) and I/O failures -> 1;
    bad input (ValueError, a missing file or directory, an unreadable image) -> 2.
    """
    catalog = sys.modules.get("hspace.catalog")
    if catalog is not None and isinstance(error, catalog.CatalogError):
        return 1
    storage = sys.modules.get("pipeline.storage")
    if storage is not None and isinstance(error, storage.CorruptShardError):
        return 1
    image = sys.modules.get("PIL.Image")
    if image is not None and isinstance(error, image.UnidentifiedImageError):
        return 2
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    if isinstance(error, OSError):
        return 1
    return None


def _fail(message: str, code: int = 2, hint: str | None = None) -> None:
    typer.echo(f"Error: {message}", err=True)
    if hint:
        typer.echo(f"Hint: {hint}", err=True)
    raise typer.Exit(code)


#: What to try next after an expected error, per command (default: the command's --help).
_HINTS = {
    "catalog": "`hspace catalog list URL` shows a catalog's models and refs, `--model NAME` a model's "
    "versions, `hspace catalog show URL MODEL` a version's directions",
    "edit": "`hspace catalog show URL MODEL` lists a catalog's directions; `hspace edit --help` the options",
}


def _hint(fn: Callable[..., Any]) -> str:
    name = fn.__name__
    if name.startswith("catalog_"):
        return _HINTS["catalog"]
    return _HINTS.get(name, f"`hspace {name.replace('_', '-')} --help` lists the options")


def _user_errors(fn: F) -> F:
    """Print expected errors as one message with a hint and exit with :func:`_exit_code`; re-raise bugs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            code = _exit_code(error)
            if code is None:
                raise
            message = str(error) or type(error).__name__
            if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
                message = f"{message}: {error.filename}"
            _fail(message, code, _hint(fn))

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# parsing
def parse_int_list(text: str, what: str = "--seeds") -> list[int]:
    """Non-negative ints from ranges and lists: ``0-7``, ``0,3,5``, ``0-3,10,12-14`` (ranges inclusive)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{what} is empty: give e.g. 0-7 or 0,3,5")
    out: list[int] = []
    for part in text.split(","):
        item = part.strip()
        lo, sep, hi = item.partition("-")
        try:
            start = int(lo)
            stop = int(hi) if sep else start
            if lo.strip() != lo or hi.strip() != hi or (sep and not hi):
                raise ValueError
        except ValueError:
            raise UsageError(
                f"{what}: {item!r} in {text!r} is not a number or range; use e.g. 0-7, 0,3,5 or 0-3,10"
            ) from None
        if start < 0:
            raise UsageError(f"{what}: {item!r} is negative; values must be >= 0")
        if stop < start:
            raise UsageError(f"{what}: range {item!r} goes down; write it as {stop}-{start}")
        if len(out) + stop - start + 1 > MAX_LIST:
            raise UsageError(f"{what}: {text!r} expands to more than {MAX_LIST} values")
        out.extend(range(start, stop + 1))
    return out


def parse_float_list(text: str, what: str = "--scales") -> list[float]:
    """Finite floats from a comma list: ``-2,0,2`` (write ``--scales=-2,0,2`` if the shell splits it)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{what} is empty: give e.g. -2,0,2")
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(
                f"{what}: {part.strip()!r} in {text!r} is not a number; use e.g. -2,0,2"
            ) from None
        if not math.isfinite(value):
            raise UsageError(f"{what}: {part.strip()!r} is not finite")
        values.append(value)
    return values


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON (an object, e.g. ``{"anon": true}``) -> dict; None -> {}."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--storage-options is not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--storage-options must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# models, samplers, images
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def load_model(
    model: str, *, revision: str | None, device: str, dtype: str, capture: str | None = None
) -> HSpaceModel:
    """``toy`` / ``toy-text`` (the shipped weights), a local pipeline / UNet directory, or a hub id
    (+ revision)."""
    import torch

    from hspace.model import HSpaceModel
    from hspace.toy import TOY_MODEL_DIRS, resolve_model_source

    source = resolve_model_source(model)
    if model in TOY_MODEL_DIRS:
        if not (Path(source) / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"the toy model is not installed ({source} has no unet/config.json); "
                "train it with `hspace train-toy --out <dir>` and pass --model <dir>, or pass another --model"
            )
        revision = None  # the shipped weights have no revisions
    return HSpaceModel.from_pretrained(
        source, revision=revision, device=_device(device), dtype=getattr(torch, dtype), capture=capture
    )


def _sampler(model: HSpaceModel, kind: str, steps: int, eta: float | None) -> HSpaceSampler:
    from hspace.sampling import HSpaceSampler

    return HSpaceSampler(model, sampler=kind, num_inference_steps=steps, eta=eta)


def _wrap(images: Tensor, cols: int) -> Tensor:
    """[N, C, H, W] -> [ceil(N / cols), cols, C, H, W], empty cells white."""
    import torch

    n = images.shape[0]
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    cells = torch.ones(rows * cols, *images.shape[1:], dtype=images.dtype)
    cells[:n] = images
    return cells.view(rows, cols, *images.shape[1:])


def _seed_text(seeds: Sequence[int]) -> str:
    """Seeds as ranges: [0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    for s in seeds:
        if parts and parts[-1].split("-")[-1] == str(s - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{s}"
        else:
            parts.append(str(s))
    return ",".join(parts)


def _save_grid(
    cells: Tensor,
    out: Path,
    what: str,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> None:
    """Write cells [R, K, C, H, W] in [0, 1] as one PNG grid: every cell upscaled (nearest) to at
    least MIN_CELL pixels, GRID_PAD pixels between cells, rows and columns labelled. The layout
    goes into the PNG's ``hspace:grid`` text chunk so a reader can cut the cells back out."""
    from PIL.PngImagePlugin import PngInfo

    from hspace.images import image_grid

    rows, cols, _, height, width = cells.shape
    image = image_grid(cells, min_cell=MIN_CELL, pad=GRID_PAD, row_labels=row_labels, col_labels=col_labels)
    scale = max(1, math.ceil(MIN_CELL / height))
    cell_h, cell_w = height * scale, width * scale
    layout = {
        "rows": rows,
        "cols": cols,
        "cell": [cell_h, cell_w],
        "scale": scale,
        "pad": GRID_PAD,
        "left": image.width - cols * cell_w - (cols + 1) * GRID_PAD,
        "top": image.height - rows * cell_h - (rows + 1) * GRID_PAD,
        "row_labels": list(row_labels or []),
        "col_labels": list(col_labels or []),
    }
    info = PngInfo()
    info.add_text(GRID_KEY, json.dumps(layout))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", pnginfo=info)
    typer.echo(f"wrote {out} ({what}, {image.width}x{image.height} px, cells {cell_w}x{cell_h} px)")


def _save_tensors(out: Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """safetensors file with JSON-encoded string metadata (no pickle)."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    typer.echo(f"wrote {out} ({shapes})")


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


# ---------------------------------------------------------------------------------------------
# shared options
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="'toy' or 'toy-text' (shipped weights), a diffusers pipeline dir (DDPM, LDM, Stable Diffusion, "
        "SDXL, DiT) or UNet dir, or a hub id",
    ),
]
RevisionOpt = Annotated[str | None, typer.Option(help="hub revision (branch, tag or commit) of --model")]
SeedsOpt = Annotated[str, typer.Option(help="seeds: ranges and lists, e.g. 0-7, 0,3,5 or 0-3,10")]
SamplerOpt = Annotated[
    SamplerKind, typer.Option(help="ddpm (eta = 1), ddim (eta default 0), dpm, euler or euler_a")
]
EtaOpt = Annotated[float | None, typer.Option(help="DDIM eta (ddpm: must be 1 or unset)")]
BatchOpt = Annotated[int | None, typer.Option(help="rows per U-Net batch (default: all at once)")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda, cuda:1, ...")]
DTypeOpt = Annotated[DType, typer.Option(help="model dtype")]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="progress bars (default: when stderr is a terminal)"),
]
StorageOpt = Annotated[
    str | None, typer.Option(help="fsspec storage options as JSON, e.g. '{\"anon\": true}'")
]
PromptOpt = Annotated[
    list[str] | None,
    typer.Option("--prompt", help="text models: the prompt; repeat it for several, cycled over the seeds"),
]
NegativePromptOpt = Annotated[
    str | None, typer.Option("--negative-prompt", help="text models: the negative prompt")
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option("--guidance", help="classifier-free guidance scale (default: the model's; 1 = none)"),
]
ClassLabelsOpt = Annotated[
    str | None,
    typer.Option(
        "--class-labels", help="class-conditional models: class ids cycled over the seeds, e.g. 207,360"
    ),
]
CaptureOpt = Annotated[
    str | None,
    typer.Option(help="h-space capture point: a module of the denoiser, e.g. mid_block, mid_block:input"),
]


def catalog_conditioning(recorded: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """The conditioning a catalog version was built with, for ``seeds``: seed ``s`` gets entry
    ``s % len`` of the recorded prompts / class labels, as the build gave them; options given on
    the command line take precedence."""

    def per_seed(values: Any) -> list | None:
        if values is None or values == []:
            return None
        items = values if isinstance(values, list) else [values]
        return [items[int(s) % len(items)] for s in seeds]

    out: dict[str, Any] = {}
    for key, recorded_key in (
        ("prompt", "prompts"),
        ("negative_prompt", "negative_prompt"),
        ("class_labels", "class_labels"),
    ):
        values = per_seed(recorded.get(recorded_key))
        if values is not None:
            out[key] = values
    if isinstance(recorded.get("guidance_scale"), (int, float)):
        out["guidance_scale"] = float(recorded["guidance_scale"])
    return out


def conditioning_options(
    prompt: list[str] | None, negative_prompt: str | None, guidance: float | None, class_labels: str | None
) -> dict[str, Any]:
    """The sampler's conditioning keywords from the command-line options (only those given)."""
    options: dict[str, Any] = {}
    if prompt:
        options["prompt"] = list(prompt)
    if negative_prompt is not None:
        options["negative_prompt"] = negative_prompt
    if guidance is not None:
        options["guidance_scale"] = guidance
    if class_labels is not None:
        options["class_labels"] = parse_int_list(class_labels, "--class-labels")
    return options


# ---------------------------------------------------------------------------------------------
# sampling commands
@app.command()
@_user_errors
def sample(
    seeds: SeedsOpt = "0-7",
    out: Annotated[Path, typer.Option(help="grid PNG to write")] = Path("grid.png"),
    model: ModelOpt = "toy",
    revision: RevisionOpt = None,
    steps: Annotated[int, typer.Option(help="sampler steps")] = 50,
    sampler: SamplerOpt = SamplerKind.ddpm,
    eta: EtaOpt = None,
    cols: Annotated[int, typer.Option(min=1, help="grid columns")] = 8,
    save_h: Annotated[
        Path | None, typer.Option(help="also write h [B, T, C, H, W] (+ seeds, timesteps) as safetensors")
    ] = None,
    h_dtype: Annotated[DType, typer.Option(help="dtype of the saved h")] = DType.float16,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float32,
    progress: ProgressOpt = None,
    prompt: PromptOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    class_labels: ClassLabelsOpt = None,
    capture: CaptureOpt = None,
) -> None:
    """Render seeds to a grid PNG (row-major, --cols per row), optionally saving their h."""
    import torch

    seed_list = parse_int_list(seeds, "--seeds")
    conditioning = conditioning_options(prompt, negative_prompt, guidance, class_labels)
    hs_model = load_model(model, revision=revision, device=device, dtype=dtype.value, capture=capture)
    hs_sampler = _sampler(hs_model, sampler.value, steps, eta)
    traj = hs_sampler.sample(
        seed_list,
        **conditioning,
        record_h=save_h is not None,
        h_dtype=getattr(torch, h_dtype.value),
        batch_size=batch_size,
        progress=_progress(progress),
    )
    grid = _wrap(traj.images, cols)
    per_row = grid.shape[1]
    row_seeds = [seed_list[r * per_row : (r + 1) * per_row] for r in range(grid.shape[0])]
    _save_grid(
        grid,
        out,
        f"{len(seed_list)} samples",
        row_labels=[f"seeds {_seed_text(s)}" for s in row_seeds],
        col_labels=[f"+{c}" for c in range(per_row)] if len(row_seeds) > 1 else [str(s) for s in seed_list],
    )
    if save_h is not None:
        assert traj.h is not None
        _save_tensors(
            save_h,
            {
                "h": traj.h,
                "seeds": torch.tensor(seed_list, dtype=torch.int64),
                "timesteps": traj.timesteps.long(),
            },
            {
                "format": "hspace.h/1",
                "model_id": hs_model.model_id,
                "revision": hs_model.revision or "",
                "model_fingerprint": hs_model.fingerprint,
                "sampler": {"kind": sampler.value, "num_inference_steps": steps, "eta": hs_sampler.eta},
                "model": hs_model.describe(),
                "conditioning": {
                    "prompts": traj.prompts,
                    "negative_prompts": traj.negative_prompts,
                    "class_labels": traj.class_labels,
                    "guidance_scale": traj.guidance_scale,
                    "record_branch": traj.record_branch,
                },
            },
        )


def _edit_direction(
    direction: str | None,
    direction_name: str | None,
    catalog: str | None,
    name: str | None,
    catalog_model: str | None,
    ref: str,
    storage_options: dict[str, Any],
) -> tuple[Any, dict[str, Any] | None]:
    """The direction to apply and, from a catalog, the sampler settings its version was built with."""
    if (direction is None) == (catalog is None):
        raise UsageError("give exactly one of --direction FILE or --catalog URL (with --name NAME)")
    if direction is not None:
        if name is not None or catalog_model is not None:
            raise UsageError(
                "--name and --catalog-model go with --catalog, not --direction (use --direction-name)"
            )
        from hspace.directions import Direction

        return Direction.load(direction, storage_options, name=direction_name), None
    if name is None:
        raise UsageError("--catalog needs --name: the direction to apply")
    from hspace import catalog as catalog_mod

    cat = catalog_mod.open(catalog, storage_options)
    if catalog_model is None:
        models = cat.models()
        if len(models) != 1:
            raise UsageError(f"--catalog-model is required: catalog {catalog} holds models {models}")
        catalog_model = models[0]
    version = cat.version(catalog_model, ref)
    typer.echo(f"direction {name!r} from {catalog} model {catalog_model} version {version.version}")
    sampler = version.manifest.get("sampler")
    built_with = dict(sampler) if isinstance(sampler, dict) else {}
    built_with["conditioning"] = version.conditioning
    return version.direction(name), built_with


@app.command()
@_user_errors
def edit(
    seeds: SeedsOpt = "0-3",
    scales: Annotated[
        str, typer.Option(help="edit strengths, one column each, e.g. --scales=-2,0,2")
    ] = "-2,0,2",
    out: Annotated[Path, typer.Option(help="strip PNG to write (rows seeds, columns scales)")] = Path(
        "strip.png"
    ),
    direction: Annotated[
        str | None, typer.Option(help="direction safetensors file (path or fsspec URL)")
    ] = None,
    direction_name: Annotated[
        str | None, typer.Option(help="which direction, if the file holds several")
    ] = None,
    catalog: Annotated[str | None, typer.Option(help="catalog URL to take the direction from")] = None,
    name: Annotated[str | None, typer.Option(help="direction name in the catalog version")] = None,
    catalog_model: Annotated[
        str | None, typer.Option(help="model name in the catalog (default: its only model)")
    ] = None,
    ref: Annotated[str, typer.Option("--ref", "--version", help="catalog ref or version id")] = "latest",
    storage_options: StorageOpt = None,
    units: Annotated[
        Units, typer.Option(help="raw: gamma * v_t; sigma: gamma * sigma_t * v_t / |v_t|")
    ] = Units.raw,
    mode: Annotated[Mode, typer.Option(help="both: edited h in P_t and D_t; asyrp: in P_t only")] = Mode.both,
    edit_steps: Annotated[
        str | None, typer.Option(help="step indices to edit (0 = noisiest), e.g. 0-24; default all")
    ] = None,
    model: ModelOpt = "toy",
    revision: RevisionOpt = None,
    steps: Annotated[
        int | None, typer.Option(help="sampler steps (default: the direction's / catalog's, else 50)")
    ] = None,
    sampler: Annotated[
        SamplerKind | None,
        typer.Option(help="ddpm, ddim, dpm, euler, euler_a (default: the catalog's, else ddpm)"),
    ] = None,
    eta: EtaOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float32,
    progress: ProgressOpt = None,
    prompt: PromptOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    class_labels: ClassLabelsOpt = None,
    branches: Annotated[
        EditBranchesOpt, typer.Option(help="under guidance, the branches the edit enters")
    ] = EditBranchesOpt.both,
) -> None:
    """Apply an h-space direction at several scales: a strip with one row per seed, one column per scale."""
    seed_list = parse_int_list(seeds, "--seeds")
    conditioning = conditioning_options(prompt, negative_prompt, guidance, class_labels)
    scale_list = parse_float_list(scales, "--scales")
    options = parse_storage_options(storage_options)
    step_list = parse_int_list(edit_steps, "--edit-steps") if edit_steps is not None else None
    vector, built_with = _edit_direction(
        direction, direction_name, catalog, name, catalog_model, ref, options
    )
    built_with = built_with or {}
    conditioning = {**catalog_conditioning(built_with.get("conditioning") or {}, seed_list), **conditioning}
    kind = sampler.value if sampler is not None else str(built_with.get("kind") or "ddpm")
    if steps is None:
        steps = vector.n_steps or built_with.get("num_inference_steps") or 50
    if eta is None and sampler is None and built_with.get("eta") is not None and kind == "ddim":
        eta = float(built_with["eta"])
    hs_model = load_model(model, revision=revision, device=device, dtype=dtype.value, capture=vector.capture)
    hs_sampler = _sampler(hs_model, kind, int(steps), eta)
    images = hs_sampler.sample_edits(
        seed_list,
        vector,
        scale_list,
        mode=mode.value,
        units=units.value,
        steps=step_list,
        branches=branches.value,
        batch_size=batch_size,
        progress=_progress(progress),
        **conditioning,
    )
    what = (
        f"{len(seed_list)} seeds x scales {scale_list} of {vector.name!r}, {units.value} units, {mode.value}"
    )
    _save_grid(
        images,
        out,
        what,
        row_labels=[f"seed {s}" for s in seed_list],
        col_labels=[f"{g:+g}" for g in scale_list],
    )


@app.command()
@_user_errors
def swap(
    seeds_a: Annotated[str, typer.Option(help="seeds that keep their noise (x_T, z_t)")] = "0-3",
    seeds_b: Annotated[str, typer.Option(help="seeds that give their h (same count as --seeds-a)")] = "4-7",
    out: Annotated[Path, typer.Option(help="grid PNG: rows a, b, a with h from b")] = Path("swap.png"),
    swap_steps: Annotated[
        str | None, typer.Option(help="step indices where h is swapped (0 = noisiest); default all")
    ] = None,
    model: ModelOpt = "toy",
    revision: RevisionOpt = None,
    steps: Annotated[int, typer.Option(help="sampler steps")] = 50,
    sampler: SamplerOpt = SamplerKind.ddpm,
    eta: EtaOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float32,
    progress: ProgressOpt = None,
    prompt: PromptOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: GuidanceOpt = None,
    class_labels: ClassLabelsOpt = None,
    capture: CaptureOpt = None,
) -> None:
    """h-swap (paper Fig. 2a): render seeds a with the h of seeds b; rows a, b, swapped.

    With guidance each branch takes the donor's h of the same branch."""
    import torch

    conditioning = conditioning_options(prompt, negative_prompt, guidance, class_labels)
    list_a, list_b = parse_int_list(seeds_a, "--seeds-a"), parse_int_list(seeds_b, "--seeds-b")
    if len(list_a) != len(list_b):
        raise UsageError(f"--seeds-a has {len(list_a)} seeds but --seeds-b has {len(list_b)}; give as many")
    step_list = parse_int_list(swap_steps, "--swap-steps") if swap_steps is not None else None
    hs_model = load_model(model, revision=revision, device=device, dtype=dtype.value, capture=capture)
    hs_sampler = _sampler(hs_model, sampler.value, steps, eta)
    show = _progress(progress)
    plain_a = hs_sampler.sample(list_a, record_h=False, batch_size=batch_size, progress=show, **conditioning)
    donor = hs_sampler.sample(
        list_b, batch_size=batch_size, progress=show, record_branch="both", **conditioning
    )
    swapped = hs_sampler.sample(
        list_a,
        **conditioning,
        record_h=False,
        h_replace=donor,
        h_replace_steps=step_list,
        batch_size=batch_size,
        progress=show,
    )
    grid = torch.stack([plain_a.images, donor.images, swapped.images])
    _save_grid(
        grid,
        out,
        f"{len(list_a)} pairs: a, b, a with h from b",
        row_labels=["a", "b", "a+h(b)"],
        col_labels=[f"{a}/{b}" for a, b in zip(list_a, list_b, strict=True)],
    )


@app.command()
@_user_errors
def invert(
    images: Annotated[
        list[Path], typer.Argument(help="image files (resized and centre-cropped to the model)")
    ],
    out: Annotated[Path, typer.Option(help="grid PNG: originals over reconstructions")] = Path(
        "inversion.png"
    ),
    save: Annotated[
        Path | None, typer.Option(help="also write x_T and h of the inversion as safetensors")
    ] = None,
    model: ModelOpt = "toy",
    revision: RevisionOpt = None,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float32,
    progress: ProgressOpt = None,
    prompt: PromptOpt = None,
    negative_prompt: NegativePromptOpt = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="guidance scale of the inversion (default 1: none)")
    ] = None,
    class_labels: ClassLabelsOpt = None,
    capture: CaptureOpt = None,
) -> None:
    """DDIM-invert images (eta = 0), reconstruct them from x_T and print the PSNR of each.

    A latent model encodes the images with its VAE first; a text model inverts under --prompt
    (one per image, or one for all), a class-conditional one under --class-labels."""
    import torch

    from hspace.inversion import reconstruction_report

    conditioning = conditioning_options(prompt, negative_prompt, guidance, class_labels)
    hs_model = load_model(model, revision=revision, device=device, dtype=dtype.value, capture=capture)
    report = reconstruction_report(
        hs_model, [str(p) for p in images], steps, batch_size=batch_size, progress=_progress(progress),
        **conditioning,
    )  # fmt: skip
    for path, value in zip(images, report.psnr.tolist(), strict=True):
        typer.echo(f"{path}: PSNR {value:.2f} dB")
    typer.echo(str(report))
    grid = torch.stack([report.inversion.images, report.reconstruction.images])
    _save_grid(
        grid,
        out,
        f"{len(images)} images: originals, reconstructions",
        row_labels=["original", "reconstructed"],
        col_labels=[Path(p).name for p in images],
    )
    if save is not None:
        inv = report.inversion
        tensors = {"x_T": inv.x_T, "timesteps": inv.timesteps.long(), "psnr": report.psnr}
        if inv.h is not None:
            tensors["h"] = inv.h
        _save_tensors(
            save,
            tensors,
            {
                "format": "hspace.inversion/1",
                "images": [str(p) for p in images],
                "model_id": hs_model.model_id,
                "model_fingerprint": hs_model.fingerprint,
                "num_inference_steps": inv.num_inference_steps,
            },
        )


# ---------------------------------------------------------------------------------------------
# catalog commands
def _open_catalog(url: str, storage_options: str | None):
    """An existing catalog at ``url`` (a URL with nothing there is an error, not an empty catalog)."""
    from hspace import catalog as catalog_mod

    options = parse_storage_options(storage_options)
    try:
        cat = catalog_mod.open(url, options)
    except (ValueError, ImportError) as err:
        raise UsageError(
            f"catalog URL {url!r} cannot be opened ({err}); use a local path or an fsspec URL such as "
            "s3://bucket/prefix or memory://name"
        ) from None
    if not cat.fs.exists(cat.root):
        raise FileNotFoundError(f"no catalog at {url}: nothing exists there")
    return cat


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Plain fixed-width table (left-aligned text, two spaces between columns)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _refs_by_version(refs: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ref, version in sorted(refs.items()):
        out.setdefault(version, []).append(ref)
    return out


def _versions_of(cat: Any, url: str, model: str) -> list[dict[str, Any]]:
    """One row per complete version of ``model``: id, created, direction count, refs (oldest first)."""
    versions = cat.versions(model)
    if not versions:
        raise FileNotFoundError(
            f"catalog {url} has no complete versions of model {model!r}; models: {cat.models()} "
            f"(hint: `hspace catalog list {url}`)"
        )
    by_version = _refs_by_version(cat.refs(model))
    rows = []
    for v in versions:
        manifest = cat.read_manifest(model, v)
        rows.append(
            {
                "version": v,
                "created": manifest.get("created"),
                "directions": len(manifest["directions"]),
                "refs": by_version.get(v, []),
            }
        )
    return rows


def _listing(cat: Any, url: str, model: str | None) -> dict[str, Any]:
    """``catalog list --json``: every model with its refs and version ids, or one model's versions."""
    if model is not None:
        return {"catalog": url, "model": model, "versions": _versions_of(cat, url, model)}
    return {
        "catalog": url,
        "models": [{"model": m, "versions": cat.versions(m), "refs": cat.refs(m)} for m in cat.models()],
    }


@catalog_app.command("list")
@_user_errors
def catalog_list(
    url: Annotated[str, typer.Argument(help="catalog URL (path, s3://..., memory://...)")],
    model: Annotated[str | None, typer.Option(help="list this model's versions")] = None,
    storage_options: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the listing as JSON")] = False,
) -> None:
    """List the models of a catalog, or one model's complete versions (oldest first) and refs."""
    cat = _open_catalog(url, storage_options)
    if as_json:
        typer.echo(json.dumps(_listing(cat, url, model), indent=1, sort_keys=True))
        return
    if model is None:
        models = cat.models()
        if not models:
            typer.echo(f"{url}: no models (no complete versions)")
            return
        rows = []
        for m in models:
            refs = cat.refs(m)
            rows.append(
                [m, len(cat.versions(m)), ", ".join(f"{r} -> {v}" for r, v in sorted(refs.items())) or "-"]
            )
        typer.echo(_table(rows, ["model", "versions", "refs"]))
        return
    rows = [
        [r["version"], r["created"] or "?", r["directions"], ", ".join(r["refs"])]
        for r in _versions_of(cat, url, model)
    ]
    typer.echo(_table(rows, ["version", "created", "directions", "refs"]))


def _grade_text(grade: Any) -> str:
    """'A', 'F (wrong_sign)', or '-' for an ungraded direction."""
    if not isinstance(grade, dict) or "letter" not in grade:
        return "-"
    flags = grade.get("flags") or []
    return str(grade["letter"]) + (f" ({','.join(flags)})" if flags else "")


@catalog_app.command("show")
@_user_errors
def catalog_show(
    url: Annotated[str, typer.Argument(help="catalog URL")],
    model: Annotated[str, typer.Argument(help="model name in the catalog")],
    ref: Annotated[str, typer.Argument(help="ref or version id")] = "latest",
    storage_options: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest as JSON")] = False,
    verify: Annotated[bool, typer.Option(help="check the size and sha256 of every file")] = False,
) -> None:
    """Summarise one version's manifest: model, sampler, files and directions (with grade, its
    confidence, and leakage: the largest effect on another attribute as a share of that attribute's
    own best direction)."""
    from hspace.grade import confidence_text, leakage_text

    cat = _open_catalog(url, storage_options)
    version = cat.version(model, ref)
    if verify:
        version.verify()
    m = version.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=1, sort_keys=True))
        return
    refs = _refs_by_version(cat.refs(model)).get(version.version, [])
    info = m.get("model") or {}
    timesteps = m.get("timesteps") or []
    span = f" ({timesteps[0]} .. {timesteps[-1]})" if timesteps else ""
    files = m["files"]
    lines = [
        f"model       {model} (id {info.get('id')}, revision {info.get('revision')}, "
        f"fingerprint {info.get('fingerprint')})",
        f"version     {version.version}" + (f" (refs: {', '.join(refs)})" if refs else ""),
        f"created     {m.get('created')} by hspace {m.get('code_version')}",
        f"sampler     {json.dumps(m.get('sampler'), sort_keys=True)}",
        f"timesteps   {len(timesteps)}{span}",
        f"inputs      {', '.join(sorted(m.get('inputs') or {})) or '-'}",
        f"files       {len(files)}, {_human(sum(int(f['bytes']) for f in files))}"
        + (" (verified)" if verify else ""),
    ]
    for f in files:
        lines.append(f"  {f['path']}  {_human(int(f['bytes']))}  sha256 {f['sha256'][:12]}")
    typer.echo("\n".join(lines))
    rows = [
        [
            d["name"],
            d.get("kind", "?"),
            "x".join(str(s) for s in d.get("shape", [])),
            d.get("units", "?"),
            "yes" if d.get("has_sigma") else "no",
            f"{d['norm']:.4g}" if isinstance(d.get("norm"), (int, float)) else "?",
            _grade_text(d.get("grade")),
            confidence_text(d.get("grade")),
            leakage_text(d.get("grade"), short=True),
        ]
        for d in m["directions"]
    ]
    typer.echo(f"directions  {len(rows)}")
    typer.echo(
        _table(rows, ["name", "kind", "shape", "units", "sigma", "norm", "grade", "confidence", "leakage"])
    )


def _verify_version(version: Any) -> list[str]:
    """Check every file of one version against its manifest; one message per bad file."""
    from hspace.catalog import ChecksumError

    bad = []
    for rel in version.files():
        try:
            version.read_file(rel)
        except (ChecksumError, FileNotFoundError) as err:
            bad.append(f"{rel}: {err}")
    return bad


@catalog_app.command("verify")
@_user_errors
def catalog_verify(
    url: Annotated[str, typer.Argument(help="catalog URL")],
    model: Annotated[str | None, typer.Argument(help="model name (default: every model)")] = None,
    version: Annotated[
        str | None, typer.Argument(help="ref or version id (default: every complete version)")
    ] = None,
    storage_options: StorageOpt = None,
) -> None:
    """Check the size and sha256 of every file of a version against its manifest; exit 1 naming each
    file that is missing or differs."""
    cat = _open_catalog(url, storage_options)
    models = [model] if model is not None else cat.models()
    if not models:
        raise FileNotFoundError(
            f"catalog {url} has no models (hint: is the URL right? `hspace catalog list {url}`)"
        )
    n_files, failures = 0, []
    for m in models:
        ids = [cat.resolve(m, version)] if version is not None else cat.versions(m)
        if not ids:
            raise FileNotFoundError(
                f"catalog {url} has no complete versions of model {m!r}; models: {cat.models()}"
            )
        for v in ids:
            checked = cat.version(m, v)
            bad = _verify_version(checked)
            n_files += len(checked.files())
            failures += [f"{m}/{v}/{b}" for b in bad]
            status = "ok" if not bad else f"{len(bad)} bad"
            typer.echo(f"{m} {v}: {len(checked.files())} files, {status}")
    for line in failures:
        typer.echo(f"MISMATCH {line}", err=True)
    if failures:
        _fail(f"{len(failures)} of {n_files} files do not match their manifest (first: {failures[0]})", 1)
    typer.echo(f"verified {n_files} files: all match their manifests")


@catalog_app.command("diff")
@_user_errors
def catalog_diff(
    url: Annotated[str, typer.Argument(help="catalog URL")],
    model: Annotated[str, typer.Argument(help="model name in the catalog")],
    a: Annotated[str, typer.Argument(help="ref or version id (old)")],
    b: Annotated[str, typer.Argument(help="ref or version id (new)")],
    storage_options: StorageOpt = None,
) -> None:
    """Cosine similarity of every direction two versions share; directions added and removed."""
    cat = _open_catalog(url, storage_options)
    d = cat.diff(model, a, b)
    typer.echo(f"{model}: {d.a} -> {d.b}")
    if d.cosine:
        typer.echo(_table([[n, f"{c:+.4f}"] for n, c in d.cosine.items()], ["direction", "cosine"]))
    for label, names in (("added", d.added), ("removed", d.removed), ("incompatible shapes", d.incompatible)):
        typer.echo(f"{label}: {', '.join(names) if names else '-'}")


@catalog_app.command("gc")
@_user_errors
def catalog_gc(
    url: Annotated[str, typer.Argument(help="catalog URL")],
    model: Annotated[str, typer.Argument(help="model name in the catalog")],
    keep: Annotated[
        int, typer.Option(help="newest complete versions to keep (referenced ones are always kept)")
    ] = 5,
    grace_s: Annotated[float, typer.Option(help="leave incomplete versions younger than this (s)")] = 3600.0,
    reader_grace_s: Annotated[
        float | None,
        typer.Option(
            help="remove an unreferenced version only this long after gc first found it so, letting "
            "readers that resolved it finish (s; default: --grace-s; 0 removes at once)"
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="list what would be removed; remove nothing")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Remove old unreferenced versions (and stale incomplete ones) of a model."""
    cat = _open_catalog(url, storage_options)
    if model not in cat.models() and not cat.versions(model):
        raise FileNotFoundError(f"catalog {url} has no model {model!r}; models: {cat.models()}")
    removed = cat.gc(model, keep=keep, grace_s=grace_s, reader_grace_s=reader_grace_s, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(removed)} version(s) of {model}" + (":" if removed else ""))
    for v in removed:
        typer.echo(f"  {v}")


# ---------------------------------------------------------------------------------------------
# building and training
@app.command()
@_user_errors
def build(
    config: Annotated[Path, typer.Option(help="YAML build config, e.g. configs/quickstart.yaml")],
    dry_run: Annotated[bool, typer.Option(help="validate the config and print the plan; do no work")] = False,
    run_url: Annotated[str | None, typer.Option(help="override storage.run_url")] = None,
    catalog_url: Annotated[str | None, typer.Option(help="override catalog.url")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress output")] = False,
    verbose: Annotated[
        bool, typer.Option(help="keep Ray's own log lines and worker warnings (also: HSPACE_VERBOSE=1)")
    ] = False,
) -> None:
    """Build a direction catalog with the Ray pipeline (pipeline.build.main); needs hspace[pipeline]."""
    if not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    argv = ["--config", str(config)]
    argv += ["--run-url", run_url] if run_url else []
    argv += ["--catalog-url", catalog_url] if catalog_url else []
    argv += ["--dry-run"] if dry_run else []
    argv += ["--quiet"] if quiet else []
    argv += ["--verbose"] if verbose else []
    try:
        from pipeline.build import main as build_main

        code = build_main(argv, prog="hspace build")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("ray", "pyarrow", "sklearn", "s3fs", "pipeline"):
            _fail(
                f"hspace build needs {err.name!r}: install the pipeline extras (pip install 'hspace[pipeline]')",
                1,
            )
        raise
    raise typer.Exit(code)


@app.command(
    "train-toy",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train_toy(ctx: typer.Context) -> None:
    """Train the toy face DDPM (hspace.toy.train; its options, e.g. --out DIR --steps 3000 --device cuda)."""
    from hspace.toy.train import main

    main(list(ctx.args))


@app.command()
@_user_errors
def explore(
    catalog: Annotated[str, typer.Argument(help="catalog URL (path, s3://..., memory://...)")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="'toy', 'toy-text', a local model dir or a hub id "
            "(default: the toy model a toy catalog was built from)",
        ),
    ] = None,
    storage_options: StorageOpt = None,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 8765,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="another Host name (or NAME:PORT) browsers may use for this server; repeatable "
            "(127.0.0.1, localhost, [::1] and --host are always answered)",
        ),
    ] = None,
    token: Annotated[
        bool | None,
        typer.Option(
            "--token/--no-token",
            help="require the printed per-launch access token (default: only when --host is not loopback)",
        ),
    ] = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float32,
) -> None:
    """Serve a live explorer of a catalog's directions in the browser (needs hspace[explore])."""
    try:
        from hspace.explore.command import run
    except ModuleNotFoundError as err:
        if err.name in ("starlette", "uvicorn"):
            _fail(f"hspace explore needs {err.name!r}: pip install 'hspace[explore]'", 1)
        raise
    run(
        catalog,
        model=model,
        load_model=functools.partial(load_model, revision=revision, device=device, dtype=dtype.value),
        storage_options=parse_storage_options(storage_options),
        host=host,
        port=port,
        allow_hosts=allow_host or (),
        token=token,
        echo=typer.echo,
        warn=lambda message: typer.echo(message, err=True),
    )


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
