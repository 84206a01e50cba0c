"""Connecting to Ray, and the cluster configs: Ray launcher YAML and KubeRay manifests."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import yaml

import prunetune
from prunetune.cluster.connect import code_runtime_env, connect, storage_uri

CONFIGS = Path(prunetune.__file__).parent / "cluster" / "configs"
CRD_FIELDS = Path(__file__).parent / "fixtures" / "kuberay" / "crd-fields.json"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY_MANIFESTS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


# ---------------------------------------------------------------- storage and code shipping


def test_storage_uri_makes_local_paths_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_uri("runs/search") == str(tmp_path.resolve() / "runs" / "search")
    assert storage_uri("~/runs") == str(Path.home().resolve() / "runs")


@pytest.mark.parametrize("uri", ["s3://bucket/runs/a", "gs://bucket/runs", "file:///srv/runs"])
def test_storage_uri_passes_bucket_uris_through(uri: str) -> None:
    assert storage_uri(uri) == uri


def test_storage_uri_names_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        storage_uri("ftp://host/runs")


def test_code_runtime_env_ships_the_package_directory_only_when_asked() -> None:
    assert code_runtime_env(ship_code=False) == {}
    env = code_runtime_env(ship_code=True)
    (package,) = env["py_modules"]
    assert Path(package).is_absolute()
    assert (Path(package) / "cluster" / "connect.py").is_file()
    assert Path(package).name == "prunetune"


# ---------------------------------------------------------------- connecting to Ray


@pytest.fixture
def fresh_ray(monkeypatch) -> Iterator[None]:
    """No Ray in this process before the test, none after it, and no RAY_ADDRESS."""
    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head started by `ray start --head --block`, as a second machine's would be.

    It runs in its own process session with its own temp dir, so it neither meets nor
    becomes the default cluster of anything else on this machine; killing `ray start`
    ends the whole session (its reaper kills the process group).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="pt-ray-"))
    port = free_port()
    log_path = temp_dir / "head.log"
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        f"--port={port}", "--num-cpus=2", '--resources={"evaluator_slot": 3}',
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        # Its one fixed default port would collide with other Ray instances here.
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    try:
        wait_for_head(head, log_path)
        yield f"127.0.0.1:{port}"
    finally:
        head.kill()
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_head(head: subprocess.Popen, log_path: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log_path.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start --head` did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def test_connect_without_an_address_starts_a_private_local_instance(fresh_ray) -> None:
    summary = connect(None, num_cpus=1)
    assert ray.is_initialized()
    assert summary["nodes"] == 1
    assert summary["cpus"] == 1.0
    assert summary["gpus"] == 0.0
    assert summary["custom_resources"] == {}
    (node,) = summary["node_list"]
    assert node["cpus"] == 1.0 and node["host"]
    # Already initialised: the same instance, whatever is asked.
    assert connect(None, num_cpus=2) == summary


def test_connect_by_address_joins_the_running_cluster(fresh_ray, ray_head, monkeypatch) -> None:
    summary = connect(ray_head)
    assert summary["cpus"] == 2.0
    assert summary["custom_resources"] == {"evaluator_slot": 3.0}
    assert summary["node_list"][0]["custom_resources"] == {"evaluator_slot": 3.0}
    assert ray.get_runtime_context().gcs_address.endswith(ray_head.rsplit(":", 1)[1])
    ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    assert connect(None)["custom_resources"] == {"evaluator_slot": 3.0}


def test_num_cpus_with_an_address_is_refused_before_connecting(fresh_ray) -> None:
    with pytest.raises(ValueError, match="num_cpus=4 applies to a local Ray instance only"):
        connect("127.0.0.1:1", num_cpus=4)
    assert not ray.is_initialized()


# ---------------------------------------------------------------- Ray cluster launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_valid_for_ray_up(name: str, ray_schema) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, ray_schema)
    # What `ray up` does: merge the provider's defaults, then validate the result.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_launcher_schema_rejects_a_misspelt_field(ray_schema) -> None:
    config = load("aws-gpu.yaml")
    config["available_node_types"]["gpu_8x_a100"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_head_runs_the_driver_and_workers_bring_gpus(name: str) -> None:
    config = load(name)
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in node_types.items() if k != config["head_node_type"]}
    assert workers
    for worker in workers.values():
        assert worker["resources"]["GPU"] >= 1
        assert worker["max_workers"] <= config["max_workers"]
    assert any("prunetune[sharded]" in command for command in config["setup_commands"])


def test_gcp_workers_attach_as_many_gpus_as_they_offer_ray() -> None:
    config = load("gcp-gpu.yaml")
    worker = config["available_node_types"]["gpu_8x_a100"]
    (accelerator,) = worker["node_config"]["guestAccelerators"]
    assert accelerator["acceleratorCount"] == worker["resources"]["GPU"]
    assert worker["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


def ray_image_versions(text: str) -> set[str]:
    return set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))


def test_every_config_pins_one_ray_version() -> None:
    versions = set()
    for name in LAUNCHER_CONFIGS + KUBERAY_MANIFESTS[:1]:
        versions |= ray_image_versions((CONFIGS / name).read_text())
    assert len(versions) == 1
    assert load("kuberay-raycluster.yaml")["spec"]["rayVersion"] in versions


# ---------------------------------------------------------------- KubeRay manifests vs. the CRD

TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def schema_errors(value: Any, node: dict, definitions: dict, path: str) -> list[str]:
    """Fields of `value` that the CRD field tree does not define, and type mismatches.

    Objects check their keys against `properties`, or their values against
    `additionalProperties` (maps); unknown keys pass only under preserve-unknown-fields,
    as the API server would otherwise drop them.
    """
    if "$ref" in node:
        node = definitions[node["$ref"]]
    mismatch = type_error(value, node, path)
    if mismatch:
        return [mismatch]
    errors: list[str] = []
    if isinstance(value, dict):
        properties = node.get("properties", {})
        values = node.get("additionalProperties")
        for key, child in value.items():
            if key in properties:
                errors += schema_errors(child, properties[key], definitions, f"{path}.{key}")
            elif values is not None:
                errors += schema_errors(child, values, definitions, f"{path}.{key}")
            elif not node.get("preserve-unknown-fields"):
                errors.append(f"{path}.{key}: unknown field")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            errors += schema_errors(item, node["items"], definitions, f"{path}[{i}]")
    return errors


def type_error(value: Any, node: dict, path: str) -> str | None:
    if node.get("int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        expected = "int-or-string"
    elif "type" in node:
        expected = node["type"]
        ok = TYPE_CHECKS[expected](value)
    else:
        return None
    return None if ok else f"{path}: {value!r} is not {expected}"


@pytest.fixture(scope="module")
def crd_fields() -> dict[str, Any]:
    return json.loads(CRD_FIELDS.read_text())


def manifest_errors(manifest: dict, crd_fields: dict) -> list[str]:
    """Check a manifest against its kind's tree; metadata is ObjectMeta, the API server's."""
    assert manifest["apiVersion"] == "ray.io/v1"
    assert isinstance(manifest["metadata"]["name"], str)
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    return schema_errors(body, crd_fields[manifest["kind"]], crd_fields["definitions"],
                         manifest["kind"])


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifests_use_only_fields_of_the_crd(name: str, crd_fields) -> None:
    assert manifest_errors(load(name), crd_fields) == []


def test_the_crd_check_catches_misspelt_and_mistyped_fields(crd_fields) -> None:
    manifest = load("kuberay-raycluster.yaml")
    manifest["spec"]["workerGroupSpec"] = []
    worker = manifest["spec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resource"] = {}
    worker["template"]["spec"]["tolerations"][0]["effects"] = "NoSchedule"
    manifest["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    worker["replicas"] = "1"
    assert sorted(manifest_errors(manifest, crd_fields)) == sorted([
        "RayCluster.spec.workerGroupSpec: unknown field",
        "RayCluster.spec.workerGroupSpecs[0].template.spec.containers[0].resource: unknown field",
        "RayCluster.spec.workerGroupSpecs[0].template.spec.tolerations[0].effects: unknown field",
        "RayCluster.spec.headGroupSpec.rayStartParams.num-cpus: 0 is not string",
        "RayCluster.spec.workerGroupSpecs[0].replicas: '1' is not integer",
    ])


def test_the_crd_check_follows_refs_and_preserved_subtrees() -> None:
    definitions = {"Env": {"type": "object", "properties": {"name": {"type": "string"}}}}
    tree = {"type": "object", "properties": {
        "env": {"type": "array", "items": {"$ref": "Env"}},
        "free": {"type": "object", "preserve-unknown-fields": True},
        "quantity": {"int-or-string": True},
    }}
    good = {"env": [{"name": "A"}], "free": {"anything": {"goes": 1}}, "quantity": 8}
    assert schema_errors(good, tree, definitions, "x") == []
    assert schema_errors({"quantity": "8Gi"}, tree, definitions, "x") == []
    bad = {"env": [{"name": "A", "value": "b"}], "quantity": True}
    assert schema_errors(bad, tree, definitions, "x") == [
        "x.env[0].value: unknown field", "x.quantity: True is not int-or-string"]


def test_raycluster_has_a_cpu_head_and_gpu_workers() -> None:
    spec = load("kuberay-raycluster.yaml")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    (workers,) = spec["workerGroupSpecs"]
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]


def test_rayjob_runs_the_search_on_the_raycluster_with_its_spec_mounted() -> None:
    cluster = load("kuberay-raycluster.yaml")
    job = load("kuberay-rayjob.yaml")["spec"]
    assert job["entrypoint"] == "prunetune search /specs/spec.yaml"
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/specs"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "prunetune-spec"
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert any(p.startswith("prunetune[sharded]") for p in runtime_env["pip"])
