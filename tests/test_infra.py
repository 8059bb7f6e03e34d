"""The deployment files in infra/ are checked as far as can be done without a cluster.

- the Ray cluster-launcher YAML against the JSON schema shipped in the ray package (and Ray's own
  validation after default filling);
- the core Kubernetes objects (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap) and every pod
  template inside the KubeRay CRDs with kubernetes-validate (strict: unknown fields fail);
- the KubeRay CRDs (RayJob, RayCronJob), whose schemas kubernetes-validate lacks, by structure;
- every entrypoint, config file and repository path the files name exists, and every entrypoint's
  arguments parse with that job's own argument parser.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE_ROOT = "/home/ray/hspace/"  # WORKDIR of infra/Dockerfile: the repository root in the image
K8S_VERSION = "1.30"  # oldest Kubernetes these manifests target (CronJob timeZone is GA since 1.27)

RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
RAYCRONJOB = INFRA / "kuberay" / "raycronjob.yaml"
CRONJOB = INFRA / "k8s" / "rebuild-cronjob.yaml"
LAUNCHER = INFRA / "ray-cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"

# Field names of the KubeRay v1 API (KubeRay 1.6 reference) used to catch typos in the CRDs,
# since no schema validator knows these kinds.
RAYJOB_SPEC_FIELDS = {
    "entrypoint",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "submissionMode",
    "runtimeEnvYAML",
    "rayClusterSpec",
    "clusterSelector",
    "metadata",
    "jobId",
    "suspend",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "submitterPodTemplate",
    "submitterConfig",
    "deletionStrategy",
    "managedBy",
}
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion",
    "authOptions",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "gcsFaultToleranceOptions",
    "managedBy",
}
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "numOfHosts",
    "idleTimeoutSeconds",
    "scaleStrategy",
    "suspend",
}
RAYCRONJOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one object per kind expected, got {kinds}"
    return {d["kind"]: d for d in docs}


def k8s_validate(obj: dict) -> None:
    """kubernetes-validate in strict mode; the error's first line names the field."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:  # the full message dumps the whole schema
        pytest.fail(f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {str(err).splitlines()[0]}")


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster_spec["workerGroupSpecs"]
    ]


def rayjob_specs() -> dict[str, dict]:
    """Every RayJob spec in infra/: the one-off build, the RayCronJob template, the CronJob's."""
    configmap = by_kind(load_all(CRONJOB))["ConfigMap"]
    return {
        "rayjob.yaml": load_all(RAYJOB)[0]["spec"],
        "raycronjob.yaml": load_all(RAYCRONJOB)[0]["spec"]["jobTemplate"],
        "rebuild-cronjob.yaml": yaml.safe_load(configmap["data"]["rayjob.yaml"])["spec"],
    }


def project_version() -> str:
    """The package version: ``hspace.__version__`` (pyproject.toml reads it dynamically from there)."""
    import hspace

    assert 'version = { attr = "hspace.__version__" }' in (REPO / "pyproject.toml").read_text()
    return hspace.__version__


# ----------------------------------------------------------------------------- launcher


def test_launcher_yaml_validates_against_rays_schema():
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)


def test_launcher_yaml_passes_rays_own_validation_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(LAUNCHER.read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type in the launcher config"
    assert all(types[name]["max_workers"] >= 1 for name in gpu_types)


def test_launcher_yaml_schema_rejects_a_misspelled_field():
    """The schema check above is not vacuous: an unknown node-type field fails."""
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    config["available_node_types"]["gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


# ----------------------------------------------------------------------------- core Kubernetes objects


def test_cronjob_objects_validate_with_kubernetes_validate():
    docs = load_all(CRONJOB)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    for doc in docs:
        k8s_validate(doc)


def test_kubernetes_validate_rejects_a_misspelled_field():
    """Strict validation is not vacuous: a typo in the CronJob's container fails."""
    cronjob = by_kind(load_all(CRONJOB))["CronJob"]
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    container["imagee"] = container.pop("image")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, K8S_VERSION, strict=True)


def test_pod_templates_inside_the_kuberay_crds_validate_as_pod_templates():
    for name, spec in rayjob_specs().items():
        for i, template in enumerate(pod_templates(spec["rayClusterSpec"])):
            k8s_validate(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{name.split('.')[0]}-{i}"},
                    "template": template,
                }
            )


def test_cronjob_service_account_may_create_rayjobs():
    objs = by_kind(load_all(CRONJOB))
    sa, role, binding, cron = objs["ServiceAccount"], objs["Role"], objs["RoleBinding"], objs["CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"]} in binding["subjects"]
    allowed = {
        verb
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert "create" in allowed
    assert "*" not in allowed, "least privilege: no wildcard verbs"


def test_cronjob_creates_the_rayjob_from_its_configmap():
    objs = by_kind(load_all(CRONJOB))
    cron, configmap = objs["CronJob"], objs["ConfigMap"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    script = " ".join(container.get("command", []) + container.get("args", []))
    created = re.search(r"kubectl create -f (\S+)", script)
    assert created, "the CronJob's container does not run `kubectl create -f`"
    mounted_file = Path(created.group(1))
    assert str(mounted_file.parent) == mount["mountPath"]
    assert mounted_file.name in configmap["data"]
    rayjob = yaml.safe_load(configmap["data"][mounted_file.name])
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    # `kubectl create` of the same manifest every tick needs a generated name.
    assert "generateName" in rayjob["metadata"] and "name" not in rayjob["metadata"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


# ----------------------------------------------------------------------------- KubeRay CRDs by structure


def test_kuberay_objects_use_ray_io_v1():
    assert (load_all(RAYJOB)[0]["apiVersion"], load_all(RAYJOB)[0]["kind"]) == ("ray.io/v1", "RayJob")
    cron = load_all(RAYCRONJOB)[0]
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert set(cron["spec"]) <= RAYCRONJOB_SPEC_FIELDS
    assert len(cron["spec"]["schedule"].split()) == 5, "cron schedule needs five fields"


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycronjob.yaml", "rebuild-cronjob.yaml"])
def test_rayjob_spec_structure(name):
    spec = rayjob_specs()[name]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    assert spec["entrypoint"].startswith(f"python {IMAGE_ROOT}jobs/")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, f"unknown fields {set(cluster) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    # Ray 2.60's job server wants token auth; KubeRay sets RAY_AUTH_MODE from this.
    assert cluster["authOptions"] == {"mode": "token"}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's rayStartParams is map[string]string: a YAML number here is rejected by the API server.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, f"unknown fields {set(group) - WORKER_GROUP_FIELDS}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(group)
            assert group["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"])
    assert gpu_groups, f"{name}: no GPU worker group"


def test_all_rayjobs_share_one_cluster_spec():
    """The one-off build and both schedules run on the same cluster definition."""
    specs = rayjob_specs()
    reference = specs["rayjob.yaml"]["rayClusterSpec"]
    for name, spec in specs.items():
        assert spec["rayClusterSpec"] == reference, f"{name} drifted from rayjob.yaml"


def test_schedules_run_the_rebuild_job_and_the_one_off_runs_the_build():
    specs = rayjob_specs()
    assert "jobs/build_catalog.py" in specs["rayjob.yaml"]["entrypoint"]
    assert "jobs/rebuild.py" in specs["raycronjob.yaml"]["entrypoint"]
    assert specs["raycronjob.yaml"]["entrypoint"] == specs["rebuild-cronjob.yaml"]["entrypoint"]


def test_ray_and_image_versions_agree():
    """rayVersion, the Dockerfile's base image and the installed ray are one version; the image tag
    the manifests pull is the project version."""
    import ray

    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)", DOCKERFILE.read_text())
    assert base and base.group(1) == ray.__version__
    image = f"hspace:{project_version()}"
    for name, spec in rayjob_specs().items():
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == ray.__version__, name
        for template in pod_templates(cluster):
            assert template["spec"]["containers"][0]["image"] == image, name
    assert yaml.safe_load(LAUNCHER.read_text())["docker"]["image"] == image


# ----------------------------------------------------------------------------- paths and entrypoints

PATH_RE = re.compile(r"(?<![\w./-])((?:jobs|configs|infra|pipeline|hspace|tests)/[\w./-]*\w)")


def named_paths(text: str) -> set[str]:
    """Repository paths a file names: `/home/ray/hspace/<p>` in the image, or a bare `jobs/...`."""
    return set(PATH_RE.findall(text.replace(IMAGE_ROOT, " ")))


def test_every_path_a_manifest_names_exists():
    files = [RAYJOB, RAYCRONJOB, CRONJOB, LAUNCHER, DOCKERFILE]
    checked = set()
    for path in files:
        for rel in named_paths(path.read_text()):
            checked.add(rel)
            assert (REPO / rel).exists(), f"{path.relative_to(REPO)} names {rel}, which does not exist"
    # the scan found the entrypoints and configs (it is not vacuous)
    assert {"jobs/build_catalog.py", "jobs/rebuild.py"} <= checked
    assert any(p.startswith("configs/") for p in checked)


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            args = [a for a in shlex.split(line)[1:] if not a.startswith("--")]
            sources += args[:-1]
    return sources


def test_dockerfile_copies_existing_paths_not_ignored_by_its_dockerignore():
    ignored = {
        line.strip()
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = dockerfile_copy_sources()
    assert {"hspace", "pipeline", "jobs", "configs", "pyproject.toml"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src not in ignored, f"Dockerfile copies {src} but Dockerfile.dockerignore drops it"


def entrypoints() -> list[str]:
    commands = [spec["entrypoint"] for spec in rayjob_specs().values()]
    commands.append(" ".join(json.loads(DOCKERFILE.read_text().split("CMD ", 1)[1].splitlines()[0])))
    return commands


def load_job_module(script: Path):
    spec = importlib.util.spec_from_file_location(f"_job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", entrypoints())
def test_entrypoint_arguments_parse_and_name_a_valid_config(command):
    from pipeline.config import load_config

    argv = shlex.split(command.replace(IMAGE_ROOT, ""))
    assert argv[0] == "python"
    script = REPO / argv[1]
    assert script.is_file(), f"entrypoint script {argv[1]} does not exist"
    args = load_job_module(script).build_parser().parse_args(argv[2:])
    config_path = REPO / args.config
    assert config_path.is_file(), f"{command}: config {args.config} does not exist"
    load_config(config_path)  # raises ConfigError naming the field if the config is invalid
