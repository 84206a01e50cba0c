"""A two-node Ray cluster on this machine: a search through `address=`, and a lost node.

The head and the worker are two `ray start` processes with their own CPUs and a custom
resource each (`head_node`, `worker_node`), so the test can tell where evaluations ran.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from prunetune.orchestrator.results import ResultLog

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a second Ray node on the same machine would otherwise share."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]


def start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def wait_for(log: Path, process: subprocess.Popen, text: str = "Ray runtime started") -> None:
    deadline = time.monotonic() + 120
    while text not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path):
    """Head (3 CPUs, `head_node`) and worker (2 CPUs, `worker_node`); yields the address."""
    temp = Path(tempfile.mkdtemp(prefix="pt-mn-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "PRUNETUNE_STANDIN_SECONDS": "1", "PRUNETUNE_STANDIN_CALLS": str(tmp_path / "calls.txt")}
    port = free_port()
    head = start(["--head", f"--port={port}", "--num-cpus=3", '--resources={"head_node": 1}',
                  "--include-dashboard=false", f"--temp-dir={temp}", *node_ports()],
                 tmp_path / "head.log", env)
    processes = [head]
    try:
        wait_for(tmp_path / "head.log", head)
        worker = start([f"--address=127.0.0.1:{port}", "--num-cpus=2",
                        '--resources={"worker_node": 1}', *node_ports()], tmp_path / "worker.log", env)
        processes.append(worker)
        wait_for(tmp_path / "worker.log", worker)
        yield {"address": f"127.0.0.1:{port}", "env": env, "worker": worker,
               "calls": tmp_path / "calls.txt"}
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(temp, ignore_errors=True)


DRIVER = """
import json, sys, ray
from standin import StandInEvaluator
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.search import run_search
outcome = run_search(load_spec(sys.argv[1]), StandInEvaluator)
nodes = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes()}
print("NODES " + json.dumps(nodes))
print("REPLACED " + str(outcome.summary["evaluator_replacements"]))
"""


def search(cluster: dict, tmp_path: Path, name: str, samples: int) -> subprocess.Popen:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(json.dumps({"run_dir": str(tmp_path / name), "address": cluster["address"],
                                "algorithm": {"num_samples": samples, "seed": 4},
                                "resources": {"evaluators": 2}, "max_failures": 3}))
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(spec)], env=cluster["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def output_line(output: str, prefix: str) -> str:
    return next(line[len(prefix):] for line in output.splitlines() if line.startswith(prefix))


def test_search_runs_on_both_nodes_and_survives_losing_the_worker(cluster, tmp_path) -> None:
    driver = search(cluster, tmp_path, "both", samples=8)
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, output[-3000:]
    nodes = json.loads(output_line(output, "NODES "))
    rows = ResultLog(str(tmp_path / "both")).read()
    used = {evaluator.split("@")[1] for evaluator in rows["evaluator_id"]}
    kinds = {next(r for r in resources if r.endswith("_node"))
             for node, resources in nodes.items() if node[:12] in used}
    assert kinds == {"head_node", "worker_node"}, (used, nodes)

    calls_before = len(cluster["calls"].read_text().split())
    driver = search(cluster, tmp_path, "lost", samples=16)
    log = ResultLog(str(tmp_path / "lost"))
    deadline = time.monotonic() + 180
    while len(log.evaluated_hashes()) < 5 and time.monotonic() < deadline:
        time.sleep(0.3)
    stop(cluster["worker"])
    output, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, output[-3000:]
    assert int(output_line(output, "REPLACED ")) >= 1
    rows = ResultLog(str(tmp_path / "lost")).read()
    trials = rows[rows["trial_id"] != "dense"]
    assert len(trials) == 16 and rows["config_hash"].is_unique and (rows["status"] == "ok").all()
    calls = cluster["calls"].read_text().split()[calls_before:]
    assert len(calls) == len(set(calls)) == 17, Counter(calls).most_common(3)
