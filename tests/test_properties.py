"""Property-based tests: the config loader and the run-manifest reader take any input and either parse it
or raise their one documented error type (ConfigError / ManifestError), never another exception."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import BuildConfig, ConfigError, load_config, validate_config
from pipeline.run_format import MANIFEST_SCHEMA_VERSION, parse_blocks, parse_manifest
from pipeline.storage import BlockRecord, CorruptShardError, ManifestError, RunStore
from tests.config_examples import small_config

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ------------------------------------------------------------------------------------------ strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["toy", "memory://x", "foo://x", "~nosuchuser/x", "a\x00b", "../x", "s3://b/k", "a/b"]),
)
#: Values that broke (or could break) a reader: paths, URLs, numbers at the edges of their ranges.
SPECIAL = st.sampled_from(
    [
        "toy",
        "memory://x",
        "foo://x",
        "simplecache::nope://x",
        "~nosuchuser/x",
        "~",
        "a\x00b",
        "../x",
        "/",
        "s3://b/k",
        "a/b",
        "a b",
        " x",
        "x" * 200,
        "\ud800",
        2**63 - 1,
        2**63,
        -1,
        0,
        10**9,
        math.inf,
        -math.inf,
        math.nan,
        1e308,
        [],
        {},
        [math.nan],
        ["glasses", "glasses"],
        ["a b", "a_b"],
        {"glasses": ["glasses"]},
        [{"seed": 0, "step": 0, "k": 10**6}],
        [{"seed": 2**64, "step": 0}],
    ]
)
json_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

CONFIG_FIELDS = [
    "name",
    "model",
    "model.source",
    "model.revision",
    "model.h_shape",
    "model.num_train_timesteps",
    "sampler.kind",
    "sampler.num_inference_steps",
    "sampler.eta",
    "dtype",
    "generate.n_samples",
    "generate.seed_start",
    "generate.seeds_per_block",
    "resources.workers",
    "resources.num_cpus_per_worker",
    "storage.run_url",
    "storage.storage_options",
    "catalog.url",
    "catalog.model_name",
    "catalog.ref",
    "pca.n_components",
    "pca.steps",
    "annotate",
    "annotate.classifier",
    "annotate.attributes",
    "aggregate.quantile",
    "aggregate.disentangle",
    "aggregate.condition",
    "evaluate.seed_start",
    "evaluate.n_seeds",
    "evaluate.scales",
    "jacobian",
]


def _base(model_dir) -> dict:
    return {**small_config(model_dir), "jacobian": [{"seed": 0, "step": 1, "k": 2}]}


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value
    return cfg


def _load_or_config_error(path, **kwargs) -> BuildConfig | None:
    try:
        cfg = load_config(path, **kwargs)
    except ConfigError as e:
        assert str(e).startswith("invalid build config"), e
        return None
    assert isinstance(cfg, BuildConfig)
    return cfg


# ---------------------------------------------------------------------------------------- the config


@SETTINGS
@given(text=st.text(max_size=300))
def test_any_text_loads_or_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_or_config_error(path)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_load_or_are_a_config_error(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    _load_or_config_error(path)


@SETTINGS
@given(doc=json_like)
def test_any_yaml_document_loads_or_is_a_config_error(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    _load_or_config_error(path)


@SETTINGS
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(CONFIG_FIELDS), st.one_of(SPECIAL, json_like)), min_size=1, max_size=3
    ),
    check_model=st.booleans(),
)
def test_a_valid_config_with_any_field_changed_validates_or_names_a_field(
    tiny_model_dir, changes, check_model
):
    cfg = _base(tiny_model_dir)
    for field, value in changes:
        cfg = _set(cfg, field, value)
    try:
        out = validate_config(cfg, check_model=check_model)
    except ConfigError as e:
        assert e.errors and all(isinstance(f, str) and isinstance(m, str) for f, m in e.errors)
        return
    # Whatever was accepted is finite and within the seed range.
    assert out.sampler.eta is None or math.isfinite(out.sampler.eta)
    assert 0 <= out.generate.seed_start and out.generate.seed_start + out.generate.n_samples <= 2**63


# -------------------------------------------------------------------------------------- the manifest


def _valid_manifest() -> dict:
    shard = {"path": "activations/t=0/part-w-000000.parquet", "rows": 4, "bytes": 10, "sha256": "a" * 64}
    block = {
        "key": "0-4",
        "start": 0,
        "stop": 4,
        "activations": [{**shard, "step": s, "footer_sha256": "b" * 64} for s in (0, 1)],
        "samples": {**shard, "path": "samples/part-w-000000.parquet", "step": None},
        "extra": {},
    }
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "identity": None,
        "blocks": {"0-4": block},
        "stages": {},
    }


def _read_or_manifest_error(raw: bytes) -> None:
    try:
        manifest = parse_manifest(raw, "run/_manifest.json")
        blocks = parse_blocks(manifest["blocks"], "run/_manifest.json")
    except ManifestError as e:
        assert "run/_manifest.json" in str(e), e
        return
    for key, rec in blocks.items():
        assert isinstance(rec, BlockRecord) and rec.key == key and rec.start < rec.stop
        assert all(s.rows == rec.n_seeds and len(s.sha256) == 64 for s in (*rec.activations, rec.samples))
        assert all(len(s.footer_sha256 or "") == 64 for s in rec.activations)


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_any_bytes_are_a_manifest_or_a_manifest_error(raw):
    _read_or_manifest_error(raw)


@SETTINGS
@given(doc=json_like)
def test_any_json_is_a_manifest_or_a_manifest_error(doc):
    _read_or_manifest_error(json.dumps(doc).encode())


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


MANIFEST_PATHS = [p for p in _paths(_valid_manifest()) if p]


@SETTINGS
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(MANIFEST_PATHS), st.one_of(SPECIAL, json_like)), min_size=1, max_size=3
    )
)
def test_a_valid_manifest_with_any_entry_changed_parses_or_names_the_file(changes):
    m = _valid_manifest()
    for path, value in changes:
        node = m
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = copy.deepcopy(value)  # a file holds a tree: never the same object twice
        except (KeyError, IndexError, TypeError):  # an earlier change removed the parent
            continue
    _read_or_manifest_error(json.dumps(m).encode())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), json_like.map(lambda d: json.dumps(d).encode())))
def test_run_store_readers_raise_only_manifest_errors(tmp_path, raw):
    store = RunStore(str(tmp_path / "run"))
    store.write_bytes("_manifest.json", raw)
    for read in (
        store.blocks,
        store.summary,
        lambda: store.stage("pca"),
        lambda: store.read_h(np.array([0])),
    ):
        try:
            read()
        except CorruptShardError:  # ManifestError, or a listed shard that is not there
            pass
        except KeyError as e:  # read_h: a seed in no completed block is the documented KeyError
            assert "no completed block" in str(e)
