"""The result log: atomic Parquet parts that pandas, pyarrow and DuckDB read back."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from prunetune.orchestrator import results
from prunetune.orchestrator.results import (
    ONESHOT, RECOVERED, RESULT_SCHEMA, SCHEMA_METADATA_KEY, ResultLog, make_row,
)
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.subnet import SubnetConfig

MODEL = dict(
    model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8,
)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def subnet(i: int) -> SubnetConfig:
    return SubnetConfig(layers=(0, 2), kv_heads=(1, 2), q_per_kv=(3, 2), mlp=(1 + i % 64, 64),
                        embed=1 + i % 48)


def row(i: int, metrics: dict | None = None, status: str = "ok", error: str | None = None,
        run_id: str = "run-a", stage: str = ONESHOT, trained_tokens: int | None = None) -> dict:
    return make_row(
        run_id, f"trial-{i}", subnet(i), MODEL,
        {"perplexity": 10.0 + i, "nll": math.log(10.0 + i)} if metrics is None else metrics,
        status, error, "group-0", T0 + timedelta(seconds=i), T0 + timedelta(seconds=i + 2.5), 128,
        stage=stage, trained_tokens=trained_tokens, fidelity=8,
    )


def test_make_row_has_architecture_and_exact_cost() -> None:
    r = row(3)
    s = subnet(3)
    assert r["config_hash"] == s.config_hash()
    assert SubnetConfig.from_json(r["config_json"]) == s
    assert (r["num_layers"], r["kv_heads"], r["q_heads"], r["mlp"], r["embed"]) == (2, 3, 7, 68, 4)
    cost = subnet_cost(MODEL, s, 128)
    assert {k: r[k] for k in ("params", "flops", "kv_bytes_per_token")} == {
        k: cost[k] for k in ("params", "flops", "kv_bytes_per_token")}
    assert r["eval_seconds"] == 2.5
    assert set(json.loads(r["versions"])) == {"prunetune", "torch", "transformers", "ray"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(status="done"), "status must be one of"),
        (dict(error="boom"), "error must be None"),
        (dict(status="failed"), "needs its error"),
        (dict(metrics={"params": 1.0}), "collides"),
        (dict(metrics={"perplexity": "high"}), "'perplexity' must be a number"),
        (dict(stage="trained"), "stage must be one of"),
        (dict(stage=RECOVERED), "trained_tokens must be given for a recovered row"),
        (dict(trained_tokens=1024), "trained_tokens must be given for a recovered row"),
    ],
)
def test_make_row_rejects_bad_fields(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row(0, **kwargs)


def test_make_row_needs_time_zones() -> None:
    with pytest.raises(ValueError, match="started_at: needs a time zone"):
        make_row("r", "t", subnet(0), MODEL, {}, "ok", None, "g", datetime(2025, 1, 1),
                 T0, 128)


def test_round_trip(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    rows = [row(i) for i in range(5)]
    log.append(rows)
    df = ResultLog(str(tmp_path)).read()
    assert list(df.columns) == RESULT_SCHEMA.names + ["nll", "perplexity"]
    assert len(df) == 5
    first = df.sort_values("trial_id").iloc[0]
    for name, value in rows[0].items():
        if value is None:
            assert first[name] is None or (isinstance(first[name], float) and math.isnan(first[name]))
        else:
            assert first[name] == value, name
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert df["params"].dtype == "int64"


def test_many_appends_union_metrics_and_cache_hashes(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    for i in range(40):
        metrics = {"perplexity": 10.0 + i} if i % 2 else {"perplexity": 10.0 + i, "acc_piqa": 0.5}
        log.append([row(i, metrics)])
    assert len(log.parts()) == 40
    reader = ResultLog(str(tmp_path))
    df = reader.read()
    assert len(df) == 40
    assert df["acc_piqa"].isna().sum() == 20
    assert reader.evaluated_hashes() == {subnet(i).config_hash() for i in range(40)}
    log.append([row(40)])
    assert len(reader.read()) == 41


def test_leftover_temp_file_is_ignored(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([row(0)])
    torn = Path(log.results_dir) / ".part-20250301T000000000000Z-dead.parquet.0123.tmp"
    torn.write_bytes(b"PAR1 torn write")
    assert len(log.read()) == 1
    count = duckdb.sql(f"select count(*) from '{log.results_dir}/*.parquet'").fetchall()[0][0]
    assert count == 1


class _CrashingMove:
    """A local filesystem whose rename fails, as a crash between write and rename would."""

    def __init__(self) -> None:
        self._inner = pafs.LocalFileSystem()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def move(self, src: str, dest: str) -> None:
        raise OSError("disk gone")


def test_failed_write_leaves_no_part(tmp_path: Path) -> None:
    target = tmp_path / "results" / "part-x.parquet"
    with pytest.raises(OSError, match="disk gone"):
        results.atomic_write(_CrashingMove(), str(target), b"bytes")
    assert list(target.parent.iterdir()) == []
    assert ResultLog(str(tmp_path)).parts() == []


def test_schema_description_in_parquet_metadata(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    part = log.append([row(0)])
    description = pq.read_schema(part).metadata[SCHEMA_METADATA_KEY].decode()
    for name in RESULT_SCHEMA.names:
        assert f"\n{name} (" in description
    assert "metric" in description
    assert pq.read_schema(part).field("started_at").type == pa.timestamp("us", tz="UTC")


def test_duckdb_reads_the_parts(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([row(i) for i in range(3)])
    log.append([row(3, status="failed", metrics={}, error="CUDA out of memory")])
    glob = f"{log.results_dir}/*.parquet"
    by_status = duckdb.sql(
        f"select status, count(*), max(params) from read_parquet('{glob}', union_by_name=true) "
        "group by status order by status"
    ).fetchall()
    assert [(s, n) for s, n, _ in by_status] == [("failed", 1), ("ok", 3)]
    plain = duckdb.sql(f"select count(*) from '{glob}' where status = 'ok'").fetchall()[0][0]
    assert plain == 3


def test_failed_row_keeps_its_error_and_lookup_returns_rows(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([row(1, status="failed", metrics={}, error="CUDA out of memory")])
    log.append([row(2)])
    failed = log.lookup(subnet(1).config_hash())
    assert failed["status"] == "failed" and failed["error"] == "CUDA out of memory"
    assert "perplexity" not in failed
    ok = log.lookup(subnet(2).config_hash())
    assert ok["perplexity"] == 12.0 and ok["error"] is None
    assert log.lookup("0" * 16) is None
    df = log.read()
    assert df.loc[df.status == "failed", "error"].item() == "CUDA out of memory"


def test_lookup_prefers_ok_then_latest_and_keeps_measured_nan(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([row(0, status="failed", metrics={}, error="timeout")])
    log.append([row(0, metrics={"perplexity": float("nan")}, run_id="run-b")])
    log.append([row(0, status="infeasible", metrics={}, error="params > budget")])
    found = log.lookup(subnet(0).config_hash())
    assert found["run_id"] == "run-b" and math.isnan(found["perplexity"])


def test_empty_log(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path / "never-written"))
    assert log.read().columns.tolist() == RESULT_SCHEMA.names
    assert log.evaluated_hashes() == set()
    assert log.lookup("abc") is None
    assert log.append([]) is None


def test_file_uri(tmp_path: Path) -> None:
    log = ResultLog(tmp_path.as_uri())
    log.append([row(0), row(1)])
    assert len(ResultLog(str(tmp_path)).read()) == 2


def test_append_rejects_incomplete_rows(tmp_path: Path) -> None:
    bad = row(0)
    del bad["params"]
    with pytest.raises(ValueError, match=r"row 0: missing result-log columns \['params'\]"):
        ResultLog(str(tmp_path)).append([bad])


def test_a_log_written_before_the_stage_column_reads_as_oneshot(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    old = [{k: v for k, v in row(i).items() if k not in ("stage", "trained_tokens")}
           for i in range(2)]
    table = pa.Table.from_pylist(old)
    assert "stage" not in table.column_names
    Path(log.results_dir).mkdir(parents=True)
    pq.write_table(table, Path(log.results_dir) / "part-20250301T000000000000Z-old.parquet")
    df = ResultLog(str(tmp_path)).read()
    assert (df["stage"] == ONESHOT).all() and df["trained_tokens"].isna().all()
    assert ResultLog(str(tmp_path)).evaluated_hashes() == {subnet(0).config_hash(),
                                                           subnet(1).config_hash()}
    log.append([row(0, {"perplexity": 5.0}, stage=RECOVERED, trained_tokens=1024)])
    df = ResultLog(str(tmp_path)).read()
    assert sorted(df["stage"]) == [ONESHOT, ONESHOT, RECOVERED]
    assert df.loc[df["stage"] == RECOVERED, "trained_tokens"].item() == 1024


def test_recovered_rows_are_not_the_search_cache(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([row(0)])
    log.append([row(0, {"perplexity": 5.0}, stage=RECOVERED, trained_tokens=1024),
                row(1, {"perplexity": 6.0}, stage=RECOVERED, trained_tokens=1024)])
    for reader in (log, ResultLog(str(tmp_path))):
        assert reader.evaluated_hashes() == {subnet(0).config_hash()}
        assert reader.lookup(subnet(0).config_hash())["perplexity"] == 10.0
        assert reader.lookup(subnet(1).config_hash()) is None
        assert set(reader.known()) == {subnet(0).config_hash()}
        assert len(reader.read()) == 3
        assert len(reader.read(stage=ONESHOT)) == 1
        assert sorted(reader.read(stage=RECOVERED)["perplexity"]) == [5.0, 6.0]


def test_versions_are_json() -> None:
    assert json.loads(results.library_versions())["prunetune"]
