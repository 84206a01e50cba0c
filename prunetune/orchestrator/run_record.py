"""The files of a run directory besides the result log: the spec it ran, its record, its front.

`spec.yaml` is the spec a run was started with (a resume reads it back), `run.json` the
run's record (run id, model config, layer order, the dense row's hash, the evaluators),
and `front.parquet` the latest front.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import yaml

from prunetune.orchestrator.results import open_filesystem, read_run_file, write_run_file
from prunetune.orchestrator.spec import Spec, load_spec

SPEC_FILE = "spec.yaml"
RUN_FILE = "run.json"
FRONT_FILE = "front.parquet"
PLOT_FILE = "front.png"


def resolve_run_dir(run_dir: str) -> str:
    """A URI as it is; a local path made absolute (Ray workers run in other folders)."""
    return run_dir if "://" in run_dir else os.path.abspath(run_dir)


def read_run_record(run_dir: str) -> dict[str, Any]:
    """The run's record, or an empty one for a run that has not started yet."""
    text = read_run_file(run_dir, RUN_FILE)
    return json.loads(text) if text else {}


def write_run_record(run_dir: str, record: dict[str, Any]) -> None:
    write_run_file(run_dir, RUN_FILE, json.dumps(record, indent=2, sort_keys=True, default=str))


def write_run_spec(run_dir: str, spec: Spec) -> None:
    write_run_file(run_dir, SPEC_FILE, spec.to_yaml())


def run_spec(run_dir: str) -> Spec:
    """The spec a run was started with (saved in its run directory)."""
    text = read_run_file(run_dir, SPEC_FILE)
    if text is None:
        raise FileNotFoundError(f"{run_dir}/{SPEC_FILE}: not a prunetune run directory "
                                f"(no {SPEC_FILE})")
    return load_spec(yaml.safe_load(text))


def read_front(run_dir: str) -> pd.DataFrame:
    """The run's latest `front.parquet`; empty before the first front is written."""
    import pyarrow.parquet as pq

    fs, root = open_filesystem(run_dir)
    path = f"{root}/{FRONT_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return pd.DataFrame()
    return pq.read_table(path, filesystem=fs).to_pandas()
