"""PCA stage: streaming per-timestep PCA of the stored h (paper Sec. IV-A) in Ray actors.

One actor per group of ``pca.steps_per_actor`` sampler steps streams the activation shards of its
steps batch by batch (one batch in memory, so memory stays flat as the run grows) through an
incremental PCA: hspace's torch :class:`~hspace.pca.IncrementalPCA` (default) or scikit-learn's
``IncrementalPCA`` with explicit ``partial_fit`` batches. Both keep the same state (singular
values, components, mean, variance, count), so either ends as a hspace ``PerTimestepPCA``.

Every ``pca.checkpoint_every`` batches an actor writes its state and its position (step, batches
done) to ``<run>/pca/<settings>/steps-<a>-<b>.safetensors`` (atomic replace). Actors run with
``max_restarts``: a restarted actor reloads the checkpoint in ``__init__`` and continues from the
saved batch counter. The checkpoint also records which seed blocks its state has folded in, so a
grown run is continued with the new blocks only. The driver merges the groups into one
``PerTimestepPCA``, stores it as ``<run>/pca/pca.safetensors`` and returns it.

Integrity: a checkpoint's bytes go to a file named by their sha256
(``steps-<a>-<b>.<sha256[:16]>.safetensors``), then the sidecar ``steps-<a>-<b>.safetensors.sha256.json``
(atomic replace) names that file and its sha256, then the previous file is deleted; a crash at any
point leaves a sidecar naming a complete checkpoint. An actor resumes only from a checkpoint that
matches its sidecar; a damaged one is discarded with a warning and the group is refitted from its
first batch, so a flipped byte can cost time but never change the components. The merged result's
sha256 is recorded in the manifest (``stages.pca.sha256``) and carried by :class:`PCAStageResult`;
:func:`load_stage_pca` verifies it and names the file on a mismatch.

Node loss: a call in flight on an actor whose node dies fails (``ActorUnavailableError``) although
Ray restarts the actor; the driver calls ``run`` again (until the actor's ``max_restarts`` are used
up, within :data:`LOST_CALL_RETRY_S`). A group that is done is folded in and its actor killed at
once, so the restarted actor can take the resources it held; when no live node can host an actor
for the capacity timeout (``--capacity-timeout``, :data:`pipeline.ray_runtime.DEFAULT_CAPACITY_TIMEOUT_S`)
the stage fails with a ``CapacityError`` naming the resources it needs and what the cluster has.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import BuildConfig
from pipeline.failure import root_cause
from pipeline.progress import progress_bar
from pipeline.ray_runtime import CapacityWatch, actor_demand, init_ray
from pipeline.storage import CorruptShardError, RunStore, StepBatch

__all__ = [
    "PCAGroupWorker",
    "PCAStageResult",
    "TorchBackend",
    "SklearnBackend",
    "make_backend",
    "pca_stage",
    "pca_settings",
    "step_groups",
    "fit_in_process",
    "empty_pca",
    "fold_group_state",
    "load_stage_pca",
    "read_verified",
    "remote_worker",
    "worker_kwargs",
    "write_verified",
]

CHECKPOINT_FORMAT = "pipeline.pca_checkpoint/1"
PCA_RESULT_PATH = "pca/pca.safetensors"


# ---------------------------------------------------------------------------------------------
# Backends: one streaming estimator per step, same state layout as hspace.pca.IncrementalPCA


class TorchBackend:
    """hspace's torch IncrementalPCA (float64 accumulation, Gram/eigh updates)."""

    name = "torch"

    def __init__(self, n_components: int, device: str = "cpu") -> None:
        from hspace.pca import IncrementalPCA

        self.est = IncrementalPCA(n_components, device=device)

    def partial_fit(self, x: np.ndarray) -> None:
        import torch

        self.est.partial_fit(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))

    @property
    def n_samples_seen(self) -> int:
        return int(self.est.n_samples_seen_)

    def state(self) -> dict[str, np.ndarray]:
        if not self.est.is_fitted:
            return {}
        return {
            k: getattr(self.est, k).detach().cpu().numpy()
            for k in ("components_", "singular_values_", "mean_", "var_")
        }

    def load(self, state: dict[str, np.ndarray], n_samples_seen: int) -> None:
        from hspace.pca import IncrementalPCA

        self.est = IncrementalPCA.from_state_dict(
            {"n_components": self.est.n_components, "n_samples_seen_": n_samples_seen, **state},
            device=self.est.device,
        )

    def to_hspace(self) -> Any:
        return self.est


class SklearnBackend:
    """scikit-learn's IncrementalPCA, fed float64 batches through ``partial_fit``."""

    name = "sklearn"
    _ARRAYS = (
        "components_",
        "singular_values_",
        "mean_",
        "var_",
        "explained_variance_",
        "explained_variance_ratio_",
        "noise_variance_",
    )

    def __init__(self, n_components: int, device: str = "cpu") -> None:
        from sklearn.decomposition import IncrementalPCA

        self.n_components = n_components
        self.est = IncrementalPCA(n_components=n_components)

    def partial_fit(self, x: np.ndarray) -> None:
        self.est.partial_fit(np.asarray(x, dtype=np.float64))

    @property
    def n_samples_seen(self) -> int:
        return int(getattr(self.est, "n_samples_seen_", 0))

    def state(self) -> dict[str, np.ndarray]:
        if not hasattr(self.est, "components_"):
            return {}
        return {k: np.asarray(getattr(self.est, k), dtype=np.float64) for k in self._ARRAYS}

    def load(self, state: dict[str, np.ndarray], n_samples_seen: int) -> None:
        from sklearn.decomposition import IncrementalPCA

        est = IncrementalPCA(n_components=self.n_components)
        for k in self._ARRAYS:
            v = np.asarray(state[k], dtype=np.float64)
            setattr(est, k, float(v.reshape(-1)[0]) if k == "noise_variance_" else v)  # stored as [1]
        est.n_samples_seen_ = np.int64(n_samples_seen)
        est.n_components_ = self.n_components
        est.n_features_in_ = int(est.components_.shape[1])
        self.est = est

    def to_hspace(self) -> Any:
        from hspace.pca import IncrementalPCA

        state = {
            k: v for k, v in self.state().items() if k in ("components_", "singular_values_", "mean_", "var_")
        }
        return IncrementalPCA.from_state_dict(
            {"n_components": self.n_components, "n_samples_seen_": self.n_samples_seen, **state}
        )


def make_backend(name: str, n_components: int, device: str = "cpu") -> TorchBackend | SklearnBackend:
    if name == "torch":
        return TorchBackend(n_components, device)
    if name == "sklearn":
        return SklearnBackend(n_components, device)
    raise ValueError(f"pca.backend must be 'torch' or 'sklearn', got {name!r}")


# ---------------------------------------------------------------------------------------------
# Batching


def fit_batches(
    store: RunStore, step: int, batch_size: int, min_rows: int, blocks: Sequence[str]
) -> Iterator[StepBatch]:
    """``store.iter_step_batches`` with a one-batch look-ahead: a last batch shorter than
    ``min_rows`` is folded into the one before it (scikit-learn needs >= k rows in a first batch;
    both backends see the same batches)."""
    pending: StepBatch | None = None
    for batch in store.iter_step_batches(step, batch_size, blocks=blocks):
        if pending is not None and len(batch.seeds) < min_rows:
            pending = StepBatch(
                step, np.concatenate([pending.seeds, batch.seeds]), np.concatenate([pending.h, batch.h])
            )
            continue
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending


def step_groups(steps: Sequence[int], per_actor: int) -> list[list[int]]:
    """Consecutive groups of ``per_actor`` steps, one per actor."""
    steps = sorted(steps)
    return [steps[i : i + per_actor] for i in range(0, len(steps), per_actor)]


def pca_settings(cfg: BuildConfig, identity: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """A short hash of everything a PCA state depends on, and the settings themselves.

    Checkpoints live under this hash, so a changed setting starts a fresh state instead of
    continuing one it does not match.
    """
    settings = {
        "n_components": cfg.pca.n_components,
        "backend": cfg.pca.backend,
        "batch_size": cfg.pca.batch_size,
        "steps_per_actor": cfg.pca.steps_per_actor,
        "run_identity": identity,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return digest, settings


# ---------------------------------------------------------------------------------------------
# The worker (plain class; wrapped by ray.remote in the stage)


@dataclass
class GroupPosition:
    """Where a group's current pass stands: its blocks, the step being fitted, batches done in it."""

    pass_blocks: list[str] = field(default_factory=list)
    step_index: int = 0
    batches: int = 0
    total_batches: int = 0


class PCAGroupWorker:
    """Fits the steps of one group over the run's blocks, checkpointing as it goes.

    Used as a Ray actor (``ray.remote(PCAGroupWorker).options(max_restarts=...)``); ``__init__``
    reloads the group's checkpoint, so a restarted actor continues where the checkpoint left off.
    """

    def __init__(
        self,
        *,
        run_url: str,
        storage_options: dict[str, Any],
        steps: Sequence[int],
        blocks: Sequence[str],
        n_components: int,
        backend: str,
        batch_size: int,
        checkpoint_every: int,
        checkpoint_path: str,
        device: str = "cpu",
    ) -> None:
        self.store = RunStore(run_url, storage_options)
        self.steps = list(steps)
        self.n_components = n_components
        self.backend_name = backend
        self.batch_size = batch_size
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = checkpoint_path
        self.device = device
        self.estimators = {s: make_backend(backend, n_components, device) for s in self.steps}
        self.blocks_seen: list[str] = []
        self.position = GroupPosition()
        self.listed = list(blocks)
        self.resumed_from: dict[str, Any] | None = None
        self.restart_note: str | None = None
        self.batches_run = 0
        self.blocks_fitted = 0
        self._load_checkpoint()
        self._start_pass(self.listed)

    # -- checkpoint -----------------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        """Resume from the group's checkpoint when its sha256 sidecar vouches for it.

        A checkpoint is a cache of work already done: one whose bytes do not match its sidecar
        (damage) is discarded with a note in :meth:`status` and the group is refitted from the
        first batch.
        """
        if not self.store.exists(sidecar_path(self.checkpoint_path)):
            return
        try:
            data = read_verified(self.store, self.checkpoint_path)
            tensors, metadata = _safetensors(data, self.store.describe(self.checkpoint_path))
            meta = json.loads(metadata["checkpoint"])
        except (CorruptShardError, ValueError, KeyError) as e:
            self.restart_note = f"discarded PCA checkpoint, refitting the group: {e}"
            print(f"warning: {self.restart_note}", flush=True)
            return
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("steps") != self.steps:
            self.restart_note = f"ignored checkpoint {self.checkpoint_path}: written for other steps/format"
            return
        for s, n_seen in meta["n_samples_seen"].items():
            if n_seen:
                prefix = f"step{s}."
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                self.estimators[int(s)].load(state, int(n_seen))
        self.blocks_seen = list(meta["blocks_seen"])
        self.position = GroupPosition(**meta["position"])
        self.resumed_from = {"blocks_seen": len(self.blocks_seen), **asdict(self.position)}

    def _save_checkpoint(self) -> bytes:
        """Write the state (see :func:`write_verified`); returns the bytes written."""
        from safetensors.numpy import save

        tensors: dict[str, np.ndarray] = {}
        for s, est in self.estimators.items():
            for k, v in est.state().items():
                tensors[f"step{s}.{k}"] = np.ascontiguousarray(v)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "steps": self.steps,
            "backend": self.backend_name,
            "n_components": self.n_components,
            "n_samples_seen": {str(s): e.n_samples_seen for s, e in self.estimators.items()},
            "blocks_seen": self.blocks_seen,
            "position": asdict(self.position),
        }
        data = save(tensors, metadata={"checkpoint": json.dumps(meta)})
        write_verified(self.store, self.checkpoint_path, data)
        return data

    def _start_pass(self, listed: list[str]) -> None:
        """Decide which blocks this pass folds in: an unfinished pass continues, else the new blocks."""
        listed_set = set(listed)
        if any(k not in listed_set for k in self.blocks_seen + self.position.pass_blocks):
            # A block the state has seen is no longer listed (replaced or removed): start over.
            self.restart_note = "the run's blocks changed under the PCA state; refitting from scratch"
            self.estimators = {
                s: make_backend(self.backend_name, self.n_components, self.device) for s in self.steps
            }
            self.blocks_seen, self.position = [], GroupPosition()
        if self.position.pass_blocks:
            return  # resume the interrupted pass exactly (same blocks, same batches)
        seen = set(self.blocks_seen)
        new = [k for k in listed if k not in seen]
        self.position = GroupPosition(pass_blocks=new, step_index=0, batches=0, total_batches=0)

    # -- work -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Position, what the actor resumed from, samples seen per step, process id."""
        import os

        return {
            "pid": os.getpid(),
            "steps": self.steps,
            "position": asdict(self.position),
            "blocks_seen": list(self.blocks_seen),
            "resumed_from": self.resumed_from,
            "restart_note": self.restart_note,
            "n_samples_seen": {s: e.n_samples_seen for s, e in self.estimators.items()},
            "batches_run": self.batches_run,
            "blocks_fitted": self.blocks_fitted,
        }

    def run(self, max_batches: int | None = None) -> dict[str, Any]:
        """Fit until every listed block is folded in (or ``max_batches`` more batches); returns :meth:`status`.

        An interrupted pass is finished first (same blocks, same batches), then blocks listed
        since are fitted in a further pass.
        """
        budget = math.inf if max_batches is None else max_batches
        while self.position.pass_blocks:
            n_pass = len(self.position.pass_blocks)
            if not self._run_pass(budget - self.batches_run):
                break
            self.blocks_fitted += n_pass
            self._start_pass(self.listed)
        return self.status()

    def _run_pass(self, budget: float) -> bool:
        """Fold the current pass's blocks into every step; False if ``budget`` batches ran out first."""
        pos = self.position
        done_now = 0
        min_rows = self.n_components
        while pos.step_index < len(self.steps):
            step = self.steps[pos.step_index]
            est = self.estimators[step]
            for i, batch in enumerate(
                fit_batches(self.store, step, self.batch_size, min_rows, pos.pass_blocks)
            ):
                if i < pos.batches:
                    continue  # already folded in before the checkpoint
                if done_now >= budget:
                    return False
                x = batch.h.reshape(batch.h.shape[0], -1)
                if not np.isfinite(x).all():
                    raise ValueError(f"non-finite h at step {step} for seeds {batch.seeds[:5].tolist()}...")
                est.partial_fit(x)
                pos.batches += 1
                pos.total_batches += 1
                done_now += 1
                self.batches_run += 1
                if pos.total_batches % self.checkpoint_every == 0:
                    self._save_checkpoint()
            pos.step_index += 1
            pos.batches = 0
        self.blocks_seen = self.blocks_seen + pos.pass_blocks
        self.position = GroupPosition()
        self._save_checkpoint()
        return True

    def state_bytes(self) -> bytes:
        """The group's per-step states as a safetensors file (same layout as the checkpoint)."""
        return self._save_checkpoint()


# ---------------------------------------------------------------------------------------------
# Verified files: safetensors bytes plus a sha256 sidecar


def sidecar_path(rel: str) -> str:
    """Where the file holding ``rel``'s current content and its sha256 is named (``<rel>.sha256.json``)."""
    return f"{rel}.sha256.json"


def write_verified(store: RunStore, rel: str, data: bytes) -> str:
    """Store ``data`` as the current content of ``rel``; returns its sha256.

    The bytes go to a file named by their sha256 (``<stem>.<sha256[:16]><suffix>``), then the
    sidecar, replaced atomically, names that file and its sha256, then the previous file is
    deleted. A crash at any point leaves the sidecar naming a complete file that matches it.
    """
    digest = hashlib.sha256(data).hexdigest()
    stem, dot, suffix = rel.rpartition(".")
    target = f"{stem}.{digest[:16]}.{suffix}" if dot else f"{rel}.{digest[:16]}"
    try:
        previous = json.loads(store.read_bytes(sidecar_path(rel))).get("path")
    except (FileNotFoundError, ValueError, AttributeError):
        previous = None
    store.write_bytes_atomic(target, data)
    record = {"path": target, "bytes": len(data), "sha256": digest}
    store.write_bytes_atomic(sidecar_path(rel), json.dumps(record, sort_keys=True).encode())
    if previous and previous != target:
        try:
            store.delete(previous)
        except OSError as e:  # a stale file costs space, never correctness
            print(f"warning: could not delete {store.describe(previous)}: {e}", flush=True)
    return digest


def read_verified(store: RunStore, rel: str, sha256: str | None = None) -> bytes:
    """The bytes of ``rel`` checked against ``sha256``; without ``sha256``, the current content
    that ``rel``'s sidecar names (see :func:`write_verified`).

    Raises :class:`~pipeline.storage.CorruptShardError` naming the file when it is missing, has no
    sidecar, or its sha256 differs.
    """
    path = rel
    if sha256 is None:
        try:
            record = json.loads(store.read_bytes(sidecar_path(rel)))
            path, sha256 = str(record["path"]), str(record["sha256"])
        except FileNotFoundError:
            raise CorruptShardError(
                f"{store.describe(rel)}: no sha256 sidecar ({sidecar_path(rel)})"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptShardError(
                f"{store.describe(sidecar_path(rel))}: unreadable sha256 sidecar: {e}"
            ) from e
    try:
        data = store.read_bytes(path)
    except FileNotFoundError as e:
        raise CorruptShardError(f"{store.describe(path)}: missing") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CorruptShardError(
            f"{store.describe(path)}: sha256 {digest[:12]}... does not match the recorded {sha256[:12]}..."
        )
    return data


def _safetensors(data: bytes, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (as numpy) and metadata of safetensors bytes, parsed by :mod:`hspace.io`."""
    from hspace.io import safetensors_from_bytes

    tensors, metadata = safetensors_from_bytes(data, what)
    return {k: v.numpy() for k, v in tensors.items()}, metadata


def fold_group_state(data: bytes, into: Any, backend: str, n_components: int) -> None:
    """Fold one group's checkpoint bytes into a PerTimestepPCA ``into``."""
    tensors, metadata = _safetensors(data, "PCA group state")
    meta = json.loads(metadata["checkpoint"])
    for s, n_seen in meta["n_samples_seen"].items():
        if not n_seen:
            continue
        prefix = f"step{s}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        est = make_backend(backend, n_components)
        est.load(state, int(n_seen))
        into.estimators[int(s)] = est.to_hspace()


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class PCAStageResult:
    """The merged PCA and what the stage did."""

    pca: Any  # hspace.pca.PerTimestepPCA
    path: str
    blocks: list[str]
    n_samples: int
    new_blocks: int
    batches: int
    seconds: float
    groups: list[dict[str, Any]] = field(default_factory=list)
    #: sha256 of the stored file at ``path`` (also in the manifest); readers verify against it.
    sha256: str = ""

    def summary(self) -> str:
        return (
            f"pca: {len(self.groups)} actors, {self.batches} batches over {self.new_blocks} new of "
            f"{len(self.blocks)} blocks, {self.n_samples} samples per step, {self.seconds:.1f} s -> {self.path}"
        )


def _facts(store: RunStore) -> dict[str, Any]:
    gen = store.stage("generate") or {}
    return gen.get("model", {})


def empty_pca(cfg: BuildConfig, store: RunStore) -> Any:
    from hspace.pca import PerTimestepPCA

    facts = _facts(store)
    return PerTimestepPCA(
        cfg.pca.n_components,
        cfg.sampler.num_inference_steps,
        h_shape=facts.get("h_shape"),
        timesteps=facts.get("timesteps"),
        model_fingerprint=facts.get("model_fingerprint"),
    )


def worker_kwargs(
    cfg: BuildConfig, store: RunStore, group: Sequence[int], blocks: Sequence[str]
) -> dict[str, Any]:
    """Constructor arguments of the group's worker (checkpoint path under the settings hash)."""
    digest, _ = pca_settings(cfg, store.identity())
    return {
        "run_url": cfg.storage.run_url,
        "storage_options": cfg.storage.storage_options,
        "steps": list(group),
        "blocks": list(blocks),
        "n_components": cfg.pca.n_components,
        "backend": cfg.pca.backend,
        "batch_size": cfg.pca.batch_size,
        "checkpoint_every": cfg.pca.checkpoint_every,
        "checkpoint_path": f"pca/{digest}/steps-{group[0]:04d}-{group[-1]:04d}.safetensors",
        "device": "cuda" if cfg.pca.num_gpus_per_actor > 0 else "cpu",
    }


def remote_worker(cfg: BuildConfig, max_restarts: int = 3) -> Any:
    """The Ray actor class: restarts (re-running ``__init__``, which reloads the checkpoint) and
    retries the interrupted ``run`` call on the restarted actor."""
    import ray

    return ray.remote(PCAGroupWorker).options(
        num_cpus=cfg.pca.num_cpus_per_actor,
        num_gpus=cfg.pca.num_gpus_per_actor or None,
        max_restarts=max_restarts,
        max_task_retries=max_restarts,
    )


def _stored_result(
    cfg: BuildConfig, store: RunStore, blocks: list[str], digest: str, t0: float
) -> PCAStageResult | None:
    """The stored PCA when nothing changed since it was fitted (same settings, blocks and steps).

    A stored result that fails its sha256 is refitted (the group checkpoints make that cheap)."""
    prev = store.stage("pca")
    if (
        prev is None
        or prev.get("digest") != digest
        or prev.get("blocks") != blocks
        or prev.get("steps") != cfg.pca_steps
        or not store.exists(PCA_RESULT_PATH)
    ):
        return None
    try:
        pca = load_stage_pca(store)
    except CorruptShardError as e:
        print(f"warning: refitting the PCA: {e}", flush=True)
        return None
    return PCAStageResult(
        pca,
        PCA_RESULT_PATH,
        blocks,
        int(prev["n_samples"]),
        0,
        0,
        time.perf_counter() - t0,
        sha256=str(prev["sha256"]),
    )


#: How long a group's calls lost with its actor's node are tried again while Ray restarts the actor
#: elsewhere (a replacement node may take a while to join), counted from the first lost call.
LOST_CALL_RETRY_S = 300.0


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Errors of a call whose actor or node went away; the call is retried (the actor restarts)."""
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)


def _check_retryable(error: BaseException, deadline: float) -> None:
    """Re-raise ``error`` when calling again cannot help: the actor is dead for good (its restarts
    are used up) or the retry window is over."""
    import ray

    if isinstance(error, ray.exceptions.ActorDiedError) or time.monotonic() > deadline:
        raise error


def _await(ray: Any, ref: Any, watch: CapacityWatch) -> Any:
    """``ray.get(ref)``, checking meanwhile that some node can still host the stage's actors."""
    while not ray.wait([ref], timeout=watch.poll_s)[0]:
        watch.check()
    return ray.get(ref)


def _call_with_retries(ray: Any, actor: Any, method: str, watch: CapacityWatch) -> Any:
    """``ray.get(actor.<method>.remote())``, called again while the actor is restarting elsewhere.

    A call in flight when an actor's node dies fails with ``ActorUnavailableError`` even though Ray
    restarts the actor; the restarted actor resumes from its checkpoint, so calling again is safe.
    """
    deadline = time.monotonic() + LOST_CALL_RETRY_S
    attempt = 0
    while True:
        try:
            return _await(ray, getattr(actor, method).remote(), watch)
        except _lost_errors() as e:
            _check_retryable(e, deadline)
            attempt += 1
            time.sleep(min(2.0, 0.2 * 2**attempt))


def _fit_groups(
    cfg: BuildConfig, store: RunStore, blocks: list[str], progress: bool, max_restarts: int = 3
) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """One actor per step group continues its fit over ``blocks``; returns the merged PCA, each
    group's status (in group order) and the group checkpoints' sha256.

    A group's state is folded in and its actor killed as soon as the group is done, so what it
    holds (a CPU, a GPU) is free for a group whose actor was lost with its node and restarts
    elsewhere. A call lost with its actor or node is called again while Ray restarts the actor
    (up to ``max_restarts`` times, within :data:`LOST_CALL_RETRY_S`); the restarted actor resumes
    from its checkpoint. When no live node can host an actor for the capacity timeout
    (:class:`~pipeline.ray_runtime.CapacityWatch`), the stage fails with ``CapacityError``. Every
    actor is killed at the end, whatever happens."""
    import ray

    init_ray(cfg)
    actor_cls = remote_worker(cfg, max_restarts)
    groups = step_groups(cfg.pca_steps, cfg.pca.steps_per_actor)
    watch = CapacityWatch("pca", actor_demand(cfg.pca.num_cpus_per_actor, cfg.pca.num_gpus_per_actor))
    actors = [actor_cls.remote(**worker_kwargs(cfg, store, g, blocks)) for g in groups]
    lost_since: dict[int, float] = {}  # group -> when its current run of lost calls began
    pca = empty_pca(cfg, store)
    digests: dict[int, str] = {}
    try:
        pending = {a.run.remote(): i for i, a in enumerate(actors)}
        statuses: dict[int, dict[str, Any]] = {}
        with progress_bar(total=len(actors), desc="pca step groups", unit="group", progress=progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=watch.poll_s)
                if not ready:
                    watch.check()
                    continue
                i = pending.pop(ready[0])
                try:
                    statuses[i] = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:  # the group's own error: name the group
                    root_cause(e).add_note(f"PCA step group {groups[i]}")
                    raise
                except _lost_errors() as e:
                    if i not in lost_since:  # one line per loss, not per call tried again
                        print(
                            f"pca: step group {groups[i]} lost its actor ({type(e).__name__}); retrying",
                            flush=True,
                        )
                    _check_retryable(e, lost_since.setdefault(i, time.monotonic()) + LOST_CALL_RETRY_S)
                    time.sleep(0.5)
                    pending[actors[i].run.remote()] = i
                    continue
                lost_since.pop(i, None)
                # Done: fold the group in now and let its actor go, freeing what it holds.
                data = _call_with_retries(ray, actors[i], "state_bytes", watch)
                digests[i] = hashlib.sha256(data).hexdigest()
                fold_group_state(data, pca, cfg.pca.backend, cfg.pca.n_components)
                ray.kill(actors[i], no_restart=True)
                bar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return pca, [statuses[i] for i in range(len(actors))], [digests[i] for i in range(len(actors))]


def pca_stage(cfg: BuildConfig, store: RunStore | None = None, *, progress: bool = True) -> PCAStageResult:
    """Fit (or continue) the per-timestep PCA over every listed block; store and return it."""
    store = store or RunStore(cfg.storage.run_url, cfg.storage.storage_options)
    blocks = list(store.blocks())
    if not blocks:
        raise ValueError(f"run {store.url} has no completed seed blocks: run the generate stage first")
    t0 = time.perf_counter()
    digest, settings = pca_settings(cfg, store.identity())
    result = _stored_result(cfg, store, blocks, digest, t0)  # nothing new: no actors
    if result is None:
        pca, group_info, _ = _fit_groups(cfg, store, blocks, progress)
        sha256, n_bytes = _save_pca(store, pca)
        result = PCAStageResult(
            pca=pca,
            path=PCA_RESULT_PATH,
            blocks=blocks,
            n_samples=int(min(pca.estimators[s].n_samples_seen_ for s in cfg.pca_steps)),
            new_blocks=max(st["blocks_fitted"] for st in group_info),
            batches=sum(st["batches_run"] for st in group_info),
            seconds=time.perf_counter() - t0,
            groups=group_info,
            sha256=sha256,
        )
        store.record_stage(
            "pca",
            {
                "path": PCA_RESULT_PATH,
                "sha256": sha256,
                "bytes": n_bytes,
                "blocks": blocks,
                "n_samples": result.n_samples,
                "steps": cfg.pca_steps,
                "digest": digest,
                "settings": settings,
                "seconds": result.seconds,
            },
        )
    if progress:
        print(result.summary(), flush=True)
    return result


def _save_pca(store: RunStore, pca: Any) -> tuple[str, int]:
    """Store the merged PCA (atomic replace); returns its sha256 and size for the manifest."""
    from safetensors.torch import save

    tensors, metadata = pca.to_safetensors_dict()
    data = save(tensors, metadata=metadata)
    store.write_bytes_atomic(PCA_RESULT_PATH, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def load_stage_pca(store: RunStore, sha256: str | None = None) -> Any:
    """The PCA the stage stored in the run, verified against ``sha256`` (default: the one the
    manifest records under ``stages.pca``); CorruptShardError names the file on a mismatch."""
    from hspace.io import safetensors_from_bytes
    from hspace.pca import PerTimestepPCA

    if sha256 is None:
        sha256 = (store.stage("pca") or {}).get("sha256")
        if sha256 is None:
            raise CorruptShardError(
                f"{store.describe(PCA_RESULT_PATH)}: the manifest records no sha256 for it; rerun the pca stage"
            )
    data = read_verified(store, PCA_RESULT_PATH, sha256)
    tensors, metadata = safetensors_from_bytes(data, store.describe(PCA_RESULT_PATH))
    return PerTimestepPCA.from_safetensors_dict(tensors, metadata)


def fit_in_process(
    store: RunStore,
    steps: Sequence[int],
    n_steps: int,
    n_components: int,
    backend: str = "torch",
    batch_size: int = 256,
    blocks: Sequence[str] | None = None,
) -> Any:
    """The same fit in one process without Ray (reference for tests, and for small runs)."""
    from hspace.pca import PerTimestepPCA

    blocks = list(store.blocks()) if blocks is None else list(blocks)
    pca = PerTimestepPCA(n_components, n_steps)
    for step in steps:
        est = make_backend(backend, n_components)
        for batch in fit_batches(store, step, batch_size, n_components, blocks):
            est.partial_fit(batch.h.reshape(batch.h.shape[0], -1))
        pca.estimators[step] = est.to_hspace()
    return pca


def explained_summary(pca: Any, steps: Sequence[int]) -> dict[int, list[float]]:
    """Explained-variance ratios per step (for reports)."""
    return {s: [float(v) for v in pca.estimators[s].explained_variance_ratio_] for s in steps}
