"""Where a search runs: a local Ray instance, or an existing cluster by address.

Workers import prunetune from the installed package, not from the driver's copy: a
Ray worker unpickles trial functions and evaluator actors by module name, so every node
needs the same package, and the cluster images (`configs/`) install it with
`pip install prunetune[sharded]`. Nodes brought up by hand without it can receive the
driver's copy instead through `code_runtime_env(ship_code=True)`, which uploads the
package directory to the cluster as a Ray `py_modules` runtime environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray

import prunetune

# URI schemes of pyarrow's file systems, through which Ray Tune reads its `storage_path`.
STORAGE_URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")

# Resources Ray defines on every node; whatever else a node offers is a custom resource.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def connect(
    address: str | None,
    runtime_env: dict[str, Any] | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Connect this process to Ray and return a summary of the cluster (see `cluster_summary`).

    `address` None, with `RAY_ADDRESS` unset, starts a new local instance of `num_cpus`
    CPUs (all by default) and no dashboard; it never attaches to a cluster that an
    earlier `ray start` left on this machine, so a laptop run stays private. Otherwise
    `address` (or `RAY_ADDRESS`) names an existing cluster: "auto" (the one started on
    this machine), "ray://host:10001" (Ray Client) or "host:6379" (the head's GCS).
    When Ray is already initialised in this process, nothing changes and the summary of
    the cluster in use is returned.

    A cluster that uses Ray's token authentication needs, for an explicit address,
    `RAY_AUTH_MODE=token` and the cluster's token (`RAY_AUTH_TOKEN`, or the file
    `~/.ray/auth_token`) in this process's environment: Ray (2.60) enables token mode by
    itself only for "auto" and for no address.
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     runtime_env=runtime_env)
        elif num_cpus is not None:
            raise ValueError(
                f"num_cpus={num_cpus} applies to a local Ray instance only; the cluster at "
                f"{address!r} has its own CPUs"
            )
        else:
            ray.init(address=address, runtime_env=runtime_env)
    return cluster_summary()


def cluster_summary() -> dict[str, Any]:
    """Alive nodes, CPUs, GPUs and custom resources of the connected cluster.

    Keys: nodes (count), cpus, gpus, custom_resources (name -> amount), and node_list,
    one entry per alive node with its host, cpus, gpus and custom resources.
    """
    totals = ray.cluster_resources()
    alive = [node for node in ray.nodes() if node["Alive"]]
    return {
        "nodes": len(alive),
        "cpus": totals.get("CPU", 0.0),
        "gpus": totals.get("GPU", 0.0),
        "custom_resources": _custom(totals),
        "node_list": [_node_summary(node) for node in alive],
    }


def code_runtime_env(ship_code: bool) -> dict[str, Any]:
    """The runtime environment that brings prunetune's code to the workers.

    Empty when the nodes have the package installed (the cluster configs install it);
    with `ship_code`, the driver's package directory is uploaded as a `py_modules` entry
    for nodes that lack it. Its dependencies are not shipped: those nodes need them.
    """
    if not ship_code:
        return {}
    return {"py_modules": [str(Path(prunetune.__file__).resolve().parent)]}


def storage_uri(run_dir: str) -> str:
    """A run directory as Ray Tune's `storage_path`: an absolute local path, or a bucket URI.

    Local paths are made absolute (and `~` expanded) because Tune hands the path to
    pyarrow, which takes a path without a scheme only when it is absolute. s3://, gs://
    and the other URIs of pyarrow's file systems pass through unchanged, so that the
    nodes of a multi-node run write to one shared store.
    """
    if "://" not in run_dir:
        return str(Path(run_dir).expanduser().resolve())
    scheme = urlparse(run_dir).scheme
    if scheme not in STORAGE_URI_SCHEMES:
        raise ValueError(
            f"storage {run_dir!r}: scheme {scheme!r} is not one of "
            f"{', '.join(STORAGE_URI_SCHEMES)}"
        )
    return run_dir


def _custom(resources: dict[str, float]) -> dict[str, float]:
    """Resources other than Ray's built-in ones and its per-node `node:<ip>` markers."""
    return {
        name: amount for name, amount in sorted(resources.items())
        if name not in _BUILTIN_RESOURCES and not name.startswith("node:")
    }


def _node_summary(node: dict[str, Any]) -> dict[str, Any]:
    resources = node.get("Resources", {})
    return {
        "host": node.get("NodeManagerAddress"),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
        "custom_resources": _custom(resources),
    }
