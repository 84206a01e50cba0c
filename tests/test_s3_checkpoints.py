"""Training on several workers checkpoints to `s3://` storage and resumes from it: the
same run as on a local folder, against an S3 server on this machine (moto)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
import pyarrow.fs  # noqa: E402
import ray  # noqa: E402

import test_distributed_training  # noqa: E402
from test_distributed_training import killed_then_resumed  # noqa: E402

pytestmark = pytest.mark.slow

BUCKET = "runs"


@pytest.fixture(scope="module")
def s3_storage():
    """An S3 server with an empty bucket, and this process's (so Ray's workers')
    environment pointing the AWS clients at it; Ray starts after."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    environment = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "test",
                   "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield f"s3://{BUCKET}"
    ray.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name)
        else:
            os.environ[name] = value
    server.stop()


def stored_files(uri: str) -> list[str]:
    """The paths of every file under an `s3://` URI."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return [info.path for info in infos if info.type == pyarrow.fs.FileType.File]


def test_a_killed_run_resumes_from_its_checkpoint_in_s3(s3_storage: str, tmp_path: Path) -> None:
    ray.cloudpickle.register_pickle_by_value(test_distributed_training)
    storage = f"{s3_storage}/distill"

    def shards_in_the_bucket() -> bool:
        return any("checkpoint_" in path and path.endswith(".pt")
                   for path in stored_files(f"{storage}/killed"))

    killed_then_resumed(tmp_path, storage, 2, shards_in_the_bucket)
