"""The cluster files in ``configs/cluster/``: the AWS launcher config passes Ray's own autoscaler
validation (what ``ray up`` runs before it launches anything) and broken copies of it fail; the
KubeRay RayJob uses only fields of KubeRay's ``ray.io/v1`` API, autoscales GPU workers from zero,
and its entrypoint names a job module and a config of this repository that load. No cluster starts.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raydpo.config import load_config
from raydpo.tracking import resolve_uri

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "configs" / "cluster" / "aws.yaml"
RAYJOB = ROOT / "configs" / "cluster" / "kuberay-rayjob.yaml"
DOCS = ROOT / "docs" / "cluster.md"

# The field names of KubeRay's ray.io/v1 CRDs at each level this file uses (from
# ray-operator/config/crd/bases/ray.io_rayjobs.yaml, KubeRay v1.7). Kubernetes drops an unknown
# field without a word, so a misspelt one (minReplica) would silently not apply.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "managedBy", "networkPolicy", "rayVersion", "suspend",
                   "upgradeStrategy", "workerGroupSpecs"}
AUTOSCALER_OPTIONS = {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
                      "resources", "securityContext", "upscalingMode", "version", "volumeMounts"}
AUTH_OPTIONS = {"enableK8sTokenAuth", "mode", "secretName"}  # KubeRay >= 1.5.1
HEAD_GROUP_SPEC = {"enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType", "template"}
WORKER_GROUP_SPEC = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                     "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}


def aws() -> dict[str, Any]:
    return yaml.safe_load(AWS.read_text())


def ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does with the file before it talks to AWS: defaults merged, setup commands
    merged, docker checked (``prepare_config``), then the schema and the node types
    (``validate_config``)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# -- configs/cluster/aws.yaml -------------------------------------------------------------------


def test_aws_config_passes_ray_autoscaler_validation() -> None:
    prepared = ray_up_checks(aws())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_node_type_key(c: dict) -> None:
    c["available_node_types"]["worker.gpu"]["min_workres"] = 0


def _head_type_missing(c: dict) -> None:
    c["head_node_type"] = "head.gpu"


def _min_over_max(c: dict) -> None:
    c["available_node_types"]["worker.gpu"]["min_workers"] = c["max_workers"] + 1


def _idle_timeout_not_a_number(c: dict) -> None:
    c["idle_timeout_minutes"] = "ten"


def _fractional_gpu_resource(c: dict) -> None:
    c["available_node_types"]["worker.gpu"]["resources"] = {"GPU": 0.5}


@pytest.mark.parametrize("breakage", [_unknown_node_type_key, _head_type_missing, _min_over_max,
                                      _idle_timeout_not_a_number, _fractional_gpu_resource])
def test_aws_config_broken_copies_fail_ray_validation(breakage: Callable[[dict], None]) -> None:
    """The validation above can fail: each copy breaks one rule of Ray's schema or node types."""
    broken = aws()
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_checks(broken)


def test_aws_config_cpu_head_and_autoscaling_gpu_workers() -> None:
    c = aws()
    head = c["head_node_type"]
    gpu_types = [name for name in c["available_node_types"] if name != head]
    assert gpu_types == ["worker.gpu"]
    gpu = c["available_node_types"]["worker.gpu"]
    assert gpu["min_workers"] == 0  # nothing bills until a job asks for a GPU
    assert 0 < gpu["max_workers"] <= c["max_workers"]
    assert c["idle_timeout_minutes"] > 0
    assert not c["docker"]["head_image"].endswith("-gpu")
    assert c["docker"]["worker_image"].endswith("-gpu")
    # The containers run the Ray this project is tested with (the job driver and the client must agree).
    for image in (c["docker"]["head_image"], c["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image


def test_aws_config_installs_this_project_with_extras_it_has() -> None:
    c = aws()
    remote, local = "~/raydpo", c["file_mounts"]["~/raydpo"]
    pyproject = (ROOT / local / "pyproject.toml").read_text()  # `ray up` runs from the repository root
    assert 'name = "raydpo"' in pyproject
    remote_home = remote.replace("~", "$HOME")
    install = [cmd for cmd in c["setup_commands"] if "pip install" in cmd and remote_home in cmd]
    assert len(install) == 1, c["setup_commands"]
    extras = re.search(re.escape(remote_home) + r"\[([\w,-]+)\]", install[0]).group(1).split(",")
    for extra in extras:
        assert re.search(rf"^{re.escape(extra)} = \[", pyproject, re.MULTILINE), f"no extra {extra!r} in pyproject.toml"


def test_aws_config_gives_every_node_the_mlflow_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node's `ray start` exports MLFLOW_TRACKING_URI, and raydpo uses it when
    ``tracking.uri`` is unset."""
    c = aws()
    uris = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [cmd for cmd in c[key] if "ray start" in cmd]
        assert len(start) == 1
        m = re.search(r"export MLFLOW_TRACKING_URI=(https?://\S+?);.*ray start", start[0])
        assert m, f"{key}: no MLFLOW_TRACKING_URI before ray start"
        uris.add(m.group(1))
    (uri,) = uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve_uri(None) == uri


def test_aws_config_gives_every_node_the_token_ray_clients_read() -> None:
    """Token authentication: every node gets the file Ray's clients (and ``raydpo submit``) read
    by default, copied from the machine that runs ``ray up``, and starts Ray in token mode."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    c = ray_up_checks(aws())
    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert c["file_mounts"].get(default) == default
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [cmd for cmd in c[key] if "ray start" in cmd]
        assert re.search(r"export RAY_AUTH_MODE=token;.*ray start", start), f"{key}: token mode not set before ray start"


# -- configs/cluster/kuberay-rayjob.yaml ---------------------------------------------------------


def rayjob() -> dict[str, Any]:
    return yaml.safe_load(RAYJOB.read_text())


def unknown(fields: dict[str, Any], known: set[str]) -> set[str]:
    return set(fields) - known


def test_rayjob_uses_only_kuberay_v1_fields() -> None:
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert not unknown(spec, RAYJOB_SPEC)
    assert not unknown(cluster, RAYCLUSTER_SPEC)
    assert not unknown(cluster["autoscalerOptions"], AUTOSCALER_OPTIONS)
    assert not unknown(cluster["headGroupSpec"], HEAD_GROUP_SPEC)
    for group in cluster["workerGroupSpecs"]:
        assert not unknown(group, WORKER_GROUP_SPEC)
    # The check above can fail: a misspelt field is caught.
    assert unknown({**cluster["workerGroupSpecs"][0], "minReplica": 0}, WORKER_GROUP_SPEC) == {"minReplica"}


def test_rayjob_turns_on_token_authentication() -> None:
    """KubeRay makes the token's Secret and gives it to every Ray container and the submitter
    (``authOptions``, KubeRay >= 1.5.1, Ray >= 2.52)."""
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"} and not unknown(cluster["authOptions"], AUTH_OPTIONS)
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")) >= (2, 52, 0)


def test_rayjob_runs_once_and_autoscales_gpu_workers_from_zero() -> None:
    spec = rayjob()["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["version"] == "v2"
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # rayStartParams is map[string]string: a string
    head_container = head["template"]["spec"]["containers"][0]
    # KubeRay refuses autoscalerOptions.version together with the older env var switch.
    assert all(e["name"] != "RAY_enable_autoscaler_v2" for e in head_container.get("env", []))
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0
    assert group["maxReplicas"] > 0
    assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["image"] == head_container["image"]


def entrypoint_args() -> tuple[str, str, list[str]]:
    """``python -m MODULE CONFIG --set K=V ...`` -> (module, config, overrides), as a shell
    (the submitter's ``bash``) splits it."""
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], argv
    module, config, rest = argv[2], argv[3], argv[4:]
    assert len(rest) % 2 == 0 and rest[::2] == ["--set"] * (len(rest) // 2), f"only --set K=V may follow: {rest}"
    return module, config, rest[1::2]


def test_rayjob_entrypoint_is_a_job_of_this_repo_and_its_config_loads() -> None:
    module, config, overrides = entrypoint_args()
    assert module in ("jobs.train_dpo", "jobs.iterative_dpo")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert (ROOT / config).is_file()  # relative to working_dir, the image's copy of this repository
    cfg = load_config(ROOT / config, overrides)  # the job's own validation, overrides included
    assert cfg.train.use_gpu


def test_rayjob_output_and_cache_are_on_storage_every_pod_mounts() -> None:
    """On several nodes, output_dir and reference.cache_dir must be shared: here, paths under the
    volume that the head and every worker group mount."""
    _, config, overrides = entrypoint_args()
    cfg = load_config(ROOT / config, overrides)
    cluster = rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
                  if "persistentVolumeClaim" in volumes[m["name"]]]
        for path in (cfg.output_dir, cfg.reference.cache_dir):
            assert any(Path(path).is_relative_to(m) for m in shared), f"{path} is not on a shared volume of {pod}"


def test_rayjob_runtime_env_carries_project_and_mlflow_server() -> None:
    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert set(env) == {"working_dir", "env_vars"}
    assert re.fullmatch(r"https?://\S+", env["env_vars"]["MLFLOW_TRACKING_URI"])
    # The image the docs build copies this repository to the working_dir the job runs in.
    assert f"COPY --chown=ray:users . {env['working_dir']}" in DOCS.read_text()
