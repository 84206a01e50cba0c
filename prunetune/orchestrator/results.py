"""The result log: one Parquet row per finished trial, appended, never rewritten.

The log is the search's memory; recovered sub-networks (`stage` "recovered") are logged
beside the search's one-shot rows, and only one-shot rows are its cache. It survives crashes (every part is written under a
temporary name and renamed into place, so a reader never sees a torn file), it is the
cache that keeps `prunetune resume` from evaluating a config twice, and it is the input
of the Pareto aggregator. Parts live in `<run_dir>/results/part-<time>-<uuid>.parquet`;
`run_dir` is a local path or any URI `pyarrow.fs` understands (file://, s3://, gs://), and
pandas, polars and DuckDB read the folder directly.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from typing import Any, Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import prunetune
from prunetune.metrics import COST_METRICS
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.subnet import SubnetConfig

STATUSES = ("ok", "failed", "infeasible")
ONESHOT = "oneshot"
"""The stage of a row the search wrote: a sub-network cut from the model, not trained."""
RECOVERED = "recovered"
"""The stage of a row `prunetune recover --front` wrote: a sub-network distilled after the cut."""
STAGES = (ONESHOT, RECOVERED)
DENSE_TRIAL = "dense"
"""The trial id of the dense model's row: the reference of relative constraints and plots."""
SCHEMA_METADATA_KEY = b"prunetune.schema"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

_TIMESTAMP = pa.timestamp("us", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("run_id", pa.string(), "id of the search run the trial belongs to"),
    ("trial_id", pa.string(), "Ray Tune trial id, unique within the run"),
    ("config_hash", pa.string(), "SubnetConfig.config_hash(): sha256 prefix of config_json"),
    ("config_json", pa.string(), "canonical SubnetConfig JSON (layers, kv_heads, q_per_kv, mlp, embed)"),
    ("num_layers", pa.int64(), "decoder layers kept"),
    ("kv_heads", pa.int64(), "key/value heads kept, summed over kept layers"),
    ("q_heads", pa.int64(), "query heads kept, summed over kept layers"),
    ("mlp", pa.int64(), "MLP neurons kept, summed over kept layers"),
    ("embed", pa.int64(), "embedding channels kept"),
    ("params", pa.int64(), "parameters of the extracted sub-network (tied embeddings once)"),
    ("nonzero_params", pa.int64(), "params the weight sparsity leaves nonzero (= params "
     "without sparsity); null in logs written before the column"),
    ("flops", pa.int64(), "FLOPs of one forward pass over one sequence of the run's seq_len"),
    ("kv_bytes_per_token", pa.int64(), "KV-cache bytes per token at 2 bytes per value"),
    ("status", pa.string(), "ok | failed | infeasible"),
    ("error", pa.string(), "why the trial failed or is infeasible; null when ok"),
    ("stage", pa.string(), "oneshot (cut, as the search measured it) | recovered (distilled "
                           "after the cut); a log written before this column reads as oneshot"),
    ("trained_tokens", pa.int64(), "tokens a recovered sub-network was distilled on; null for oneshot"),
    ("evaluator_id", pa.string(), "the evaluator group that measured the trial"),
    ("started_at", _TIMESTAMP, "evaluation start, UTC"),
    ("finished_at", _TIMESTAMP, "evaluation end, UTC"),
    ("eval_seconds", pa.float64(), "finished_at - started_at in seconds"),
    ("versions", pa.string(), "JSON of the prunetune, torch, transformers and ray versions"),
    ("fidelity", pa.int64(), "evaluation windows the perplexity was scored on: all of the run's "
     "for a full evaluation, the first few for a multi-fidelity screen; null in older logs (full)"),
)
FIXED_COLUMNS = tuple(name for name, _, _ in _COLUMNS)
SCHEMA_DESCRIPTION = "\n".join(
    ["prunetune result log: one row per finished trial."]
    + [f"{name} ({dtype}): {doc}" for name, dtype, doc in _COLUMNS]
    + ["any other column (double): a metric of the evaluation, e.g. perplexity, nll, tokens, "
       "acc_piqa, latency_prefill_ms; null where the trial's run did not measure it"]
)


def schema_metadata(extra_lines: Iterable[str] = ()) -> dict[bytes, bytes]:
    """The Parquet key-value metadata that describes the columns to readers."""
    text = "\n".join([SCHEMA_DESCRIPTION, *extra_lines])
    return {SCHEMA_METADATA_KEY: text.encode()}


RESULT_SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype, _ in _COLUMNS],
                          metadata=schema_metadata())


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a URI (file://, s3://, gs://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one.

    The bytes go to a hidden temporary file in the same folder (ignored by every reader
    of the log), which is then renamed over `path`.
    """
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def write_run_file(run_dir: str, name: str, text: str) -> None:
    """Write a small file of a run directory (local path or URI), atomically."""
    fs, root = open_filesystem(run_dir)
    atomic_write(fs, posixpath.join(root, name), text.encode())


def read_run_file(run_dir: str, name: str) -> str | None:
    """The text of a run directory's file, or None if it does not exist."""
    fs, root = open_filesystem(run_dir)
    path = posixpath.join(root, name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


def table_bytes(table: pa.Table) -> bytes:
    """A table serialised as one Parquet file (zstd), ready for `atomic_write`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@lru_cache(maxsize=1)
def library_versions() -> str:
    """JSON of the versions that produced a result; null for a library not installed."""
    versions: dict[str, str | None] = {"prunetune": prunetune.__version__}
    for name in ("torch", "transformers", "ray"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return json.dumps(versions, sort_keys=True)


def make_row(
    run_id: str,
    trial_id: str,
    subnet: SubnetConfig,
    model_config: Any,
    metrics: Mapping[str, float | None],
    status: str,
    error: str | None,
    evaluator_id: str | None,
    started_at: datetime,
    finished_at: datetime,
    seq_len: int,
    fidelity: int | None = None,
    stage: str = ONESHOT,
    trained_tokens: int | None = None,
) -> dict[str, Any]:
    """One result-log row: the trial, its architecture and exact cost, and its metrics.

    Timestamps must carry a time zone (they are stored in UTC); `error` is None exactly
    when `status` is "ok"; metric names must not collide with the fixed columns.
    `fidelity` is the number of evaluation windows the metrics cover; a `recovered` row
    names the tokens it was distilled on, a `oneshot` row none.
    """
    _check_status(status, error, where="make_row")
    _check_stage(stage, trained_tokens, where="make_row")
    for name, value in (("started_at", started_at), ("finished_at", finished_at)):
        if value.tzinfo is None:
            raise ValueError(f"{name}: needs a time zone (e.g. datetime.now(timezone.utc)), got {value}")
    _check_metrics(metrics, where="make_row")
    cost = subnet_cost(model_config, subnet, seq_len=seq_len)
    row: dict[str, Any] = {
        "run_id": run_id,
        "trial_id": trial_id,
        "config_hash": subnet.config_hash(),
        "config_json": subnet.to_json(),
        "num_layers": subnet.num_layers,
        "kv_heads": sum(subnet.kv_heads),
        "q_heads": sum(kv * q for kv, q in zip(subnet.kv_heads, subnet.q_per_kv)),
        "mlp": sum(subnet.mlp),
        "embed": subnet.embed,
        **{name: cost[name] for name in COST_METRICS},
        "status": status,
        "error": error,
        "stage": stage,
        "trained_tokens": trained_tokens,
        "evaluator_id": evaluator_id,
        "started_at": started_at.astimezone(timezone.utc),
        "finished_at": finished_at.astimezone(timezone.utc),
        "eval_seconds": (finished_at - started_at).total_seconds(),
        "versions": library_versions(),
        "fidelity": fidelity,
    }
    row.update({name: None if value is None else float(value) for name, value in metrics.items()})
    return row


def _check_status(status: str, error: str | None, where: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"{where}: status must be one of {', '.join(STATUSES)}, got {status!r}")
    if status == "ok" and error is not None:
        raise ValueError(f"{where}: error must be None when status is 'ok', got {error!r}")
    if status == "failed" and not error:
        raise ValueError(f"{where}: a failed trial needs its error message")


def _check_stage(stage: str, trained_tokens: int | None, where: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"{where}: stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if (stage == RECOVERED) != (trained_tokens is not None):
        raise ValueError(f"{where}: trained_tokens must be given for a recovered row and only "
                         f"for one, got {trained_tokens!r} for stage {stage!r}")


def _check_metrics(metrics: Mapping[str, Any], where: str) -> None:
    for name, value in metrics.items():
        if name in FIXED_COLUMNS:
            raise ValueError(f"{where}: metric {name!r} collides with the result-log column of that name")
        if value is not None and (isinstance(value, bool) or not _is_number(value)):
            raise ValueError(f"{where}: metric {name!r} must be a number or None, got {value!r}")


def _is_number(value: Any) -> bool:
    try:
        math.isnan(value)
    except TypeError:
        return False
    return True


class ResultLog:
    """The append-only result log of one run directory (local path or URI), and the one
    cache of its one-shot rows by config hash: what makes every configuration evaluated once."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._fs, root = open_filesystem(run_dir)
        self._dir = posixpath.join(root, "results")
        self._seen: set[str] = set()
        self._cached = RESULT_SCHEMA.empty_table()
        self._by_hash: dict[str, dict[str, Any]] = {}

    @property
    def results_dir(self) -> str:
        """The folder of the Parquet parts, as a path of this log's filesystem."""
        return self._dir

    def append(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """Write `rows` as one new part, atomically; returns its path (None if no rows)."""
        rows = [dict(row) for row in rows]
        if not rows:
            return None
        for i, row in enumerate(rows):
            _check_row(i, row)
        table = pa.Table.from_pylist(rows, schema=_part_schema(rows))
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = posixpath.join(self._dir, f"{PART_PREFIX}{stamp}-{uuid.uuid4().hex}{PART_SUFFIX}")
        atomic_write(self._fs, path, table_bytes(table))
        for row in rows:
            self.remember(row)
        return path

    def parts(self) -> list[str]:
        """Paths of the finished parts, oldest first; temporary files are not parts."""
        selector = pafs.FileSelector(self._dir, allow_not_found=True)
        names = [
            info.path for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.startswith(PART_PREFIX) and info.base_name.endswith(PART_SUFFIX)
        ]
        return sorted(names)

    def table(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """All parts as one Arrow table; metric columns are the union over parts (null if absent).

        Parts never change once written, so only parts not seen by an earlier call are read.
        """
        table = self._refresh()
        if filter is not None:
            table = table.filter(filter)
        return table.select(columns) if columns else table

    def _refresh(self) -> pa.Table:
        new = [path for path in self.parts() if path not in self._seen]
        if new:
            factory = ds.FileSystemDatasetFactory(self._fs, new, ds.ParquetFileFormat())
            fresh = _with_stage(factory.finish(factory.inspect(promote_options="default")).to_table())
            merged = pa.concat_tables([self._cached, fresh], promote_options="default")
            self._cached = merged.combine_chunks()
            self._seen.update(new)
            for row in fresh.to_pylist():
                self.remember(row)
        return self._cached

    def read(self, stage: str | None = None) -> pd.DataFrame:
        """Every finished trial as a DataFrame, or those of one `stage` (ONESHOT, RECOVERED);
        a metric a run did not measure is NaN."""
        return self.table(filter=None if stage is None else pc.field("stage") == stage).to_pandas()

    def evaluated_hashes(self) -> set[str]:
        """Config hashes of every one-shot trial (ok, failed or infeasible): the cache keys."""
        table = self.table(columns=["config_hash"], filter=pc.field("stage") == ONESHOT)
        return set(table.column("config_hash").to_pylist())

    def lookup(self, config_hash: str, refresh: bool = True) -> dict[str, Any] | None:
        """The stored one-shot row of a config, so a cached trial reports the same metrics.

        Prefers an ok row, then the one of most windows (a full evaluation over a
        multi-fidelity screen), then the latest finished one. Metrics the row's run did not
        measure are left out; a measured NaN is kept. `refresh=False` answers from the rows
        this log has read or written so far, without listing the folder again (for the
        single writer of a run, which knows every row).
        """
        if refresh:
            self._refresh()
        return self._by_hash.get(config_hash)

    def remember(self, row: Mapping[str, Any]) -> None:
        """Take a row that is in the log into the cache (appends and reads do this). Only
        one-shot rows are the search's cache: a recovered row does not make its config
        evaluated."""
        if row.get("stage", ONESHOT) != ONESHOT:
            return
        row = {k: v for k, v in row.items() if k in FIXED_COLUMNS or v is not None}
        known = self._by_hash.get(row["config_hash"])
        if known is None or _preference(row) >= _preference(known):
            self._by_hash[row["config_hash"]] = row

    def known(self, refresh: bool = True) -> Mapping[str, dict[str, Any]]:
        """The preferred one-shot row of every logged config, by config hash."""
        if refresh:
            self._refresh()
        return self._by_hash


def _with_stage(table: pa.Table) -> pa.Table:
    """The table with its `stage` filled: parts written before the column are one-shot."""
    if "stage" not in table.column_names:
        return table.append_column(pa.field("stage", pa.string()),
                                   pa.array([ONESHOT] * len(table), pa.string()))
    index = table.column_names.index("stage")
    return table.set_column(index, "stage", pc.fill_null(table.column(index), ONESHOT))


def _preference(row: Mapping[str, Any]) -> tuple[bool, float, datetime]:
    """Which of two rows of a config a lookup answers with: ok first, then the most
    windows (no `fidelity`: an older log's full evaluation), then the latest."""
    fidelity = row.get("fidelity")
    return (row.get("status") == "ok", math.inf if fidelity is None else fidelity,
            row.get("finished_at") or _EPOCH)


def _check_row(index: int, row: Mapping[str, Any]) -> None:
    missing = [name for name in FIXED_COLUMNS if name not in row]
    if missing:
        raise ValueError(f"row {index}: missing result-log columns {missing}")
    _check_status(row["status"], row["error"], where=f"row {index}")
    _check_stage(row["stage"], row["trained_tokens"], where=f"row {index}")
    _check_metrics({k: v for k, v in row.items() if k not in FIXED_COLUMNS}, where=f"row {index}")


def _part_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    metric_names = sorted({name for row in rows for name in row} - set(FIXED_COLUMNS))
    fields = list(RESULT_SCHEMA) + [pa.field(name, pa.float64()) for name in metric_names]
    return pa.schema(fields, metadata=schema_metadata())
