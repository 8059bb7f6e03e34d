"""PCA stage on a local Ray cluster: equals the single-process fit, both backends agree, actors
resume from checkpoints, grown runs are continued with their new blocks only.

The data are synthetic h with known spectral gaps (variances 16, 8, 4 over a noise floor of
0.0025), written through RunStore as the generate stage would; no model is sampled.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pipeline.config import validate_config
from pipeline.pca_stage import (
    empty_pca,
    fit_in_process,
    fold_group_state,
    load_stage_pca,
    pca_stage,
    remote_worker,
    worker_kwargs,
)
from pipeline.storage import BlockRecord, CorruptShardError, RunStore
from tests.ray_cluster import ray_local  # noqa: F401  (session fixture)

pytestmark = pytest.mark.ray

C, H, W = 8, 2, 2
D = C * H * W
T = 4
K = 3
PER_BLOCK = 24
VARIANCES = np.array([16.0, 8.0, 4.0])


def _basis(step: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng([7, step]).standard_normal((D, D)))
    return q[:, :K].T  # [K, D] orthonormal rows


def _h(seed: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([seed, step])
    z = rng.standard_normal(K) * np.sqrt(VARIANCES)
    x = 1.0 + z @ _basis(step) + 0.05 * rng.standard_normal(D)
    return x.reshape(C, H, W).astype(np.float16)


def _add_block(store: RunStore, index: int) -> None:
    start, stop = index * PER_BLOCK, (index + 1) * PER_BLOCK
    seeds = np.arange(start, stop)
    shards = tuple(
        store.write_activations(t, 999 - 250 * t, seeds, np.stack([_h(s, t) for s in seeds]), "syn", index)
        for t in range(T)
    )
    samples = store.write_samples(seeds, [b""] * len(seeds), "syn", index)
    store.add_blocks([BlockRecord(f"{start:06d}-{stop:06d}", start, stop, shards, samples)])


def _store(path, n_blocks: int) -> RunStore:
    store = RunStore(str(path))
    store.ensure_identity({"synthetic": True, "num_inference_steps": T})
    facts = {
        "h_shape": [C, H, W],
        "timesteps": [999 - 250 * t for t in range(T)],
        "model_fingerprint": "synthetic",
    }
    store.record_stage("generate", {"model": facts})
    for i in range(n_blocks):
        _add_block(store, i)
    return store


def _cfg(model_dir, run_url: str, backend: str = "torch", steps_per_actor: int = 2):
    return validate_config(
        {
            "name": "pca-test",
            "model": {"source": str(model_dir)},
            "sampler": {"kind": "ddpm", "num_inference_steps": T},
            "generate": {"n_samples": 4 * PER_BLOCK, "seeds_per_block": PER_BLOCK},
            "storage": {"run_url": run_url},
            "catalog": {"url": "memory://unused", "model_name": "tiny"},
            # 20-row batches do not line up with 24-seed blocks: batches cross shard boundaries.
            "pca": {
                "n_components": K,
                "backend": backend,
                "batch_size": 20,
                "checkpoint_every": 1,
                "steps_per_actor": steps_per_actor,
            },
        }
    )


def _exact_components(store: RunStore, step: int) -> np.ndarray:
    x = np.concatenate([b.h.reshape(len(b.seeds), -1) for b in store.iter_step_batches(step, 1000)]).astype(
        np.float64
    )
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return vt[:K]


def _abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.abs(np.sum(a * b, axis=1))


def _components(pca, step: int) -> np.ndarray:
    return pca.estimators[step].components_.cpu().numpy()


@pytest.fixture(scope="module")
def torch_run(ray_local, tiny_model_dir, tmp_path_factory):  # noqa: F811
    store = _store(tmp_path_factory.mktemp("pca") / "run", n_blocks=4)
    cfg = _cfg(tiny_model_dir, store.url)
    return cfg, store, pca_stage(cfg, store, progress=False)


def test_stage_equals_single_process_fit_and_exact_pca(torch_run):
    cfg, store, result = torch_run
    assert result.n_samples == 4 * PER_BLOCK and result.new_blocks == 4
    assert len(result.groups) == 2  # steps {0,1} and {2,3}
    assert result.batches == T * 5  # 96 rows in batches of 20: 4 full + 16
    reference = fit_in_process(store, range(T), T, K, batch_size=20)
    for t in range(T):
        # Same batches, same float64 updates: equal up to float64 rounding of BLAS threading.
        np.testing.assert_allclose(_components(result.pca, t), _components(reference, t), atol=1e-10)
        np.testing.assert_allclose(
            result.pca.estimators[t].singular_values_.numpy(),
            reference.estimators[t].singular_values_.numpy(),
            rtol=1e-10,
        )
        # Incremental truncated PCA equals the exact PCA when the spectrum has gaps (16 : 8 : 4 >> noise).
        assert _abs_cos(_components(result.pca, t), _exact_components(store, t)).min() >= 0.999
    assert result.pca.timesteps.tolist() == [999, 749, 499, 249]
    assert result.pca.model_fingerprint == "synthetic"
    stored = load_stage_pca(store)
    np.testing.assert_array_equal(_components(stored, 2), _components(result.pca, 2))
    assert store.stage("pca")["n_samples"] == 4 * PER_BLOCK


def test_sklearn_backend_gives_the_same_components(torch_run, tiny_model_dir, tmp_path):
    _, store, torch_result = torch_run
    # Other settings hash, so separate checkpoints; one actor for all steps keeps the test cheap.
    cfg = _cfg(tiny_model_dir, store.url, backend="sklearn", steps_per_actor=T)
    result = pca_stage(cfg, store, progress=False)
    for t in range(T):
        # Both run the same incremental SVD update in float64 on the same batches.
        assert _abs_cos(_components(result.pca, t), _components(torch_result.pca, t)).min() >= 0.999
        np.testing.assert_allclose(
            result.pca.estimators[t].explained_variance_.numpy(),
            torch_result.pca.estimators[t].explained_variance_.numpy(),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            result.pca.estimators[t].mean_.numpy(), torch_result.pca.estimators[t].mean_.numpy(), atol=1e-9
        )


def test_killed_actor_restarts_from_its_checkpoint(ray_local, tiny_model_dir, tmp_path):  # noqa: F811
    ray = ray_local
    store = _store(tmp_path / "run", n_blocks=4)
    cfg = _cfg(tiny_model_dir, store.url)
    actor = remote_worker(cfg).remote(**worker_kwargs(cfg, store, [0, 1], list(store.blocks())))
    partial = ray.get(actor.run.remote(max_batches=3))
    assert partial["position"]["batches"] == 3 and partial["resumed_from"] is None
    ray.kill(actor, no_restart=False)  # dies; Ray restarts it and __init__ reloads the checkpoint
    deadline = time.monotonic() + 120
    while True:  # ray.kill is asynchronous: wait until a new process answers
        try:
            status = ray.get(actor.status.remote(), timeout=60)
            if status["pid"] != partial["pid"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the killed PCA actor was not restarted within 120 s"
        time.sleep(0.2)
    assert status["resumed_from"] is not None
    assert status["resumed_from"]["step_index"] == 0 and status["resumed_from"]["batches"] == 3
    assert status["n_samples_seen"][0] == 60  # 3 batches of 20 survived the kill
    final = ray.get(actor.run.remote())
    assert final["batches_run"] == 2 * 5 - 3  # only the batches after the checkpoint are redone
    assert final["n_samples_seen"] == {0: 96, 1: 96}
    reference = fit_in_process(store, [0, 1], T, K, batch_size=20)
    resumed = empty_pca(cfg, store)
    fold_group_state(ray.get(actor.state_bytes.remote()), resumed, "torch", K)
    ray.kill(actor, no_restart=True)
    for t in (0, 1):
        # The checkpoint stores the float64 state exactly: resuming changes nothing but rounding order.
        np.testing.assert_allclose(_components(resumed, t), _components(reference, t), atol=1e-10)


def test_grown_run_is_continued_with_new_blocks_only(ray_local, tiny_model_dir, tmp_path):  # noqa: F811
    store = _store(tmp_path / "run", n_blocks=3)
    cfg = _cfg(tiny_model_dir, store.url, steps_per_actor=T)
    first = pca_stage(cfg, store, progress=False)
    assert first.n_samples == 72 and first.new_blocks == 3
    _add_block(store, 3)  # the run grows by one seed block
    grown = pca_stage(cfg, store, progress=False)
    assert grown.new_blocks == 1 and grown.n_samples == 96
    assert grown.batches == T * 2  # only the 24 new rows per step (batches of 20 + 4) were read
    for t in range(T):
        assert _abs_cos(_components(grown.pca, t), _exact_components(store, t)).min() >= 0.999
    again = pca_stage(cfg, store, progress=False)
    assert again.new_blocks == 0 and again.batches == 0 and again.n_samples == 96


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the tensor data: a valid file with other numbers
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_discarded_and_refitted_and_a_damaged_result_is_named(
    ray_local,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    ray = ray_local
    store = _store(tmp_path / "run", n_blocks=2)
    cfg = _cfg(tiny_model_dir, store.url, steps_per_actor=T)
    kwargs = worker_kwargs(cfg, store, list(range(T)), list(store.blocks()))
    actor = remote_worker(cfg).remote(**kwargs)
    ray.get(actor.run.remote(max_batches=2))
    ray.kill(actor, no_restart=True)
    pointer = json.loads((tmp_path / "run" / (kwargs["checkpoint_path"] + ".sha256.json")).read_text())
    _flip_last_byte(tmp_path / "run" / pointer["path"])
    actor = remote_worker(cfg).remote(**kwargs)
    status = ray.get(actor.status.remote())
    assert status["resumed_from"] is None and "discarded PCA checkpoint" in status["restart_note"]
    assert "sha256" in status["restart_note"] and pointer["path"] in status["restart_note"]
    final = ray.get(actor.run.remote())
    assert final["batches_run"] == T * 3  # 48 rows per step in batches of 20: all refitted
    refit = empty_pca(cfg, store)
    fold_group_state(ray.get(actor.state_bytes.remote()), refit, "torch", K)
    ray.kill(actor, no_restart=True)
    reference = fit_in_process(store, range(T), T, K, batch_size=20)
    for t in range(T):
        np.testing.assert_allclose(_components(refit, t), _components(reference, t), atol=1e-10)

    result = pca_stage(cfg, store, progress=False)
    assert result.sha256 == store.stage("pca")["sha256"] and len(result.sha256) == 64
    _flip_last_byte(tmp_path / "run" / "pca" / "pca.safetensors")
    with pytest.raises(CorruptShardError, match=r"pca/pca\.safetensors: sha256 .* does not match"):
        load_stage_pca(store)
    again = pca_stage(cfg, store, progress=False)  # the damaged result is refitted from the checkpoints
    assert again.batches == 0 and again.sha256 == store.stage("pca")["sha256"]
    for t in range(T):
        np.testing.assert_array_equal(_components(load_stage_pca(store), t), _components(result.pca, t))
