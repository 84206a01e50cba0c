"""The Pareto aggregator against brute force, by hand, and under merging."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from prunetune.orchestrator.pareto import (
    crowding_distance,
    hypervolume,
    merge_fronts,
    non_dominated_ranks,
    objective_matrix,
    pareto_front,
    plot_front,
    rank_all,
    write_front,
)
from prunetune.orchestrator.results import RESULT_SCHEMA, SCHEMA_METADATA_KEY

DIRECTIONS = ["min", "max"]


def brute_force_ranks(F: np.ndarray) -> np.ndarray:
    """Pareto ranks by the definition: peel off the rows no remaining row dominates."""
    n = len(F)
    ranks = np.full(n, -1)
    rank = 0
    while (ranks < 0).any():
        remaining = np.flatnonzero(ranks < 0)
        front = [
            i for i in remaining
            if not any(np.all(F[j] <= F[i]) and np.any(F[j] < F[i]) for j in remaining)
        ]
        ranks[front] = rank
        rank += 1
    return ranks


def random_log(seed: int, n: int, objectives: dict[str, str]) -> pd.DataFrame:
    """Result rows with few distinct values (ties), repeated rows, failures and gaps."""
    rng = np.random.default_rng(seed)
    data = {name: rng.integers(0, 6, n).astype(float) for name in objectives}
    df = pd.DataFrame(data)
    df = pd.concat([df, df.iloc[: n // 10]], ignore_index=True)
    df["config_hash"] = [f"{i:016x}" for i in range(len(df))]
    df["run_id"] = "run-a"
    df["trial_id"] = [f"t{i}" for i in range(len(df))]
    df["status"] = np.where(rng.random(len(df)) < 0.1, "failed", "ok")
    first = next(iter(objectives))
    df.loc[rng.random(len(df)) < 0.05, first] = np.nan
    return df


def usable(df: pd.DataFrame, objectives: dict[str, str]) -> pd.DataFrame:
    return df[(df.status == "ok") & df[list(objectives)].notna().all(axis=1)]


CASES = [
    (seed, {f"o{j}": DIRECTIONS[(seed + j) % 2] for j in range(m)})
    for seed in range(3) for m in (2, 3, 4)
]


@pytest.mark.parametrize("seed, objectives", CASES)
def test_front_and_ranks_match_brute_force(seed: int, objectives: dict[str, str]) -> None:
    df = random_log(seed, 150, objectives)
    ok = usable(df, objectives)
    expected = brute_force_ranks(objective_matrix(ok, objectives))
    expected_rank = dict(zip(ok.config_hash, expected))

    front = pareto_front(df, objectives)
    assert set(front.config_hash) == {h for h, r in expected_rank.items() if r == 0}
    assert (front["rank"] == 0).all()

    ranked = rank_all(df, objectives)
    assert len(ranked) == len(ok)
    assert dict(zip(ranked.config_hash, ranked["rank"])) == expected_rank
    assert ranked["rank"].is_monotonic_increasing


def test_non_dominated_ranks_on_floats_match_brute_force() -> None:
    F = np.random.default_rng(7).random((300, 3))
    assert (non_dominated_ranks(F) == brute_force_ranks(F)).all()


def test_front_is_sorted_best_first_by_the_first_objective() -> None:
    df = pd.DataFrame({
        "acc": [0.5, 0.7, 0.6, 0.9], "params": [10, 30, 20, 40],
        "status": "ok", "config_hash": list("abcd"),
    })
    front = pareto_front(df, {"acc": "max", "params": "min"})
    assert front["acc"].tolist() == [0.9, 0.7, 0.6, 0.5]


def test_objective_matrix_negates_max_and_names_bad_input() -> None:
    df = pd.DataFrame({"params": [1, 2], "acc": [0.5, 0.25]})
    assert objective_matrix(df, {"params": "min", "acc": "max"}).tolist() == [[1, -0.5], [2, -0.25]]
    with pytest.raises(ValueError, match="objective 'latency': no such column"):
        objective_matrix(df, {"latency": "min"})
    with pytest.raises(ValueError, match="objective 'acc': direction must be 'min' or 'max'"):
        objective_matrix(df, {"acc": "maximize"})


def test_crowding_by_hand_and_infinite_at_the_extremes() -> None:
    F = np.array([[1.0, 2.0], [0.0, 4.0], [4.0, 0.0], [2.0, 1.0]])
    assert crowding_distance(F).tolist() == [1.25, math.inf, math.inf, 1.25]
    G = np.random.default_rng(3).random((50, 3))
    d = crowding_distance(G)
    extremes = {int(i) for j in range(3) for i in (G[:, j].argmin(), G[:, j].argmax())}
    assert np.isinf(d[sorted(extremes)]).all()
    assert np.isfinite(np.delete(d, sorted(extremes))).all()


def test_rank_all_crowding_is_per_rank() -> None:
    df = pd.DataFrame({
        "x": [0, 1, 2, 1, 2, 3], "y": [2, 1, 0, 3, 2, 1], "status": "ok", "config_hash": list("abcdef"),
    })
    ranked = rank_all(df, {"x": "min", "y": "min"}).set_index("config_hash")
    assert ranked["rank"].to_dict() == dict(a=0, b=0, c=0, d=1, e=1, f=1)
    assert ranked["crowding"].to_dict() == dict(a=math.inf, b=2.0, c=math.inf,
                                                d=math.inf, e=2.0, f=math.inf)


def test_hypervolume_of_a_known_set() -> None:
    F = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.5, 3.5]])
    assert hypervolume(F, [4.0, 4.0]) == pytest.approx(6.0)
    df = pd.DataFrame({"params": [1.0, 2.0, 3.0], "acc": [0.3, 0.6, 0.9]})
    G = objective_matrix(df, {"params": "min", "acc": "max"})
    assert hypervolume(G, [4.0, -0.0]) == pytest.approx(1 * 0.3 + 1 * 0.6 + 1 * 0.9)
    with pytest.raises(ValueError, match="ref: needs one value per objective"):
        hypervolume(F, [4.0])


def _by_hash(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("config_hash", kind="mergesort").reset_index(drop=True)


def test_merge_is_order_independent_and_idempotent() -> None:
    objectives = {"o0": "min", "o1": "max", "o2": "min"}
    log = random_log(11, 400, objectives)
    a = log.iloc[:250].copy()
    b = log.iloc[150:].copy()
    b.loc[b.index < 250, "run_id"] = "run-b"  # the shared rows were measured again
    b["latency_ms"] = 1.0
    b = b.sample(frac=1.0, random_state=0)

    ab = merge_fronts([a, b], objectives)
    ba = merge_fronts([b, a], objectives)
    pd.testing.assert_frame_equal(_by_hash(ab), _by_hash(ba))
    pd.testing.assert_frame_equal(_by_hash(merge_fronts([ab, b], objectives)), _by_hash(ab))
    pd.testing.assert_frame_equal(_by_hash(merge_fronts([ab], objectives)), _by_hash(ab))
    assert not ab.config_hash.duplicated().any()
    assert set(ab.config_hash) == set(pareto_front(log, objectives).config_hash)
    shared = ab[ab.config_hash.isin(a.config_hash) & ab.config_hash.isin(b.config_hash)]
    assert (shared.run_id == "run-a").all()
    assert list(ab.columns[-2:]) == ["rank", "crowding"]


def test_write_front_keeps_types_and_describes_columns(tmp_path: Path) -> None:
    df = pd.DataFrame({
        "config_hash": ["a", "b"], "params": [10, 20], "perplexity": [30.0, 20.0],
        "status": ["ok", "ok"], "error": [None, None],
        "finished_at": pd.to_datetime(["2025-01-01", "2025-01-02"], utc=True),
    })
    front = pareto_front(df, {"params": "min", "perplexity": "min"})
    target = tmp_path / "front.parquet"
    write_front(front, target.as_uri())
    schema = pq.read_schema(target)
    assert schema.field("params").type == RESULT_SCHEMA.field("params").type
    assert schema.field("error").type == RESULT_SCHEMA.field("error").type
    description = schema.metadata[SCHEMA_METADATA_KEY].decode()
    assert "config_hash (string)" in description and "\nrank (int64)" in description
    back = pd.read_parquet(target)
    assert back["rank"].tolist() == [0, 0] and back["params"].tolist() == [10, 20]
    assert [p.name for p in tmp_path.iterdir()] == ["front.parquet"]


@pytest.mark.parametrize("objectives", [
    {"params": "min", "perplexity": "min"},
    {"params": "min", "acc": "max", "perplexity": "min"},
])
def test_plot_writes_a_png(tmp_path: Path, objectives: dict[str, str]) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "params": 10 ** rng.uniform(6, 9, 200), "perplexity": rng.uniform(10, 80, 200),
        "acc": rng.uniform(0.5, 0.8, 200), "status": "ok",
        "config_hash": [f"{i:04x}" for i in range(200)],
    })
    front = pareto_front(df, objectives)
    dense = {"params": 1e9, "perplexity": 9.0, "acc": 0.82}
    path = tmp_path / "front.png"
    plot_front(df, front, objectives, str(path), dense=dense)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_plot_needs_two_objectives(tmp_path: Path) -> None:
    df = pd.DataFrame({"params": [1.0], "status": ["ok"]})
    with pytest.raises(ValueError, match="at least two objectives"):
        plot_front(df, df, {"params": "min"}, str(tmp_path / "x.png"))


def test_infinite_objective_ranks_last_without_warnings() -> None:
    df = pd.DataFrame({"params": [1.0, 2.0, 3.0], "perplexity": [math.inf, 20.0, 10.0],
                       "status": "ok", "config_hash": list("abc")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranked = rank_all(df, {"perplexity": "min", "params": "min"})
    assert ranked.config_hash.tolist() == ["c", "b", "a"]
    assert ranked["rank"].tolist() == [0, 0, 0]


def test_front_of_a_result_log_round_trips(tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from prunetune.orchestrator.results import ResultLog, make_row
    from prunetune.search_spaces.subnet import SubnetConfig

    model = dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64,
                 num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    log = ResultLog(str(tmp_path))
    rows = []
    for i, embed in enumerate((8, 16, 24, 32, 40, 48)):  # params grow with embed
        subnet = SubnetConfig(layers=(0, 1), kv_heads=(2, 2), q_per_kv=(3, 3), mlp=(64, 64),
                              embed=embed)
        failed = i == 2
        metrics = {} if failed else {"perplexity": 100.0 / embed + (5.0 if i == 3 else 0.0)}
        rows.append(make_row("run", f"t{i}", subnet, model, metrics, "failed" if failed else "ok",
                             "oom" if failed else None, "g0", t0, t0 + timedelta(seconds=1), 64))
    log.append(rows)
    objectives = {"params": "min", "perplexity": "min"}
    front = pareto_front(log.read(), objectives)
    assert front.trial_id.tolist() == ["t0", "t1", "t4", "t5"]
    write_front(front, str(tmp_path / "front.parquet"))
    back = pq.read_table(tmp_path / "front.parquet")
    assert back.schema.field("started_at").type == RESULT_SCHEMA.field("started_at").type
    assert back.column("trial_id").to_pylist() == ["t0", "t1", "t4", "t5"]
    plot_front(log.read(), front, objectives, str(tmp_path / "front.png"), dense=rows[-1])
    assert (tmp_path / "front.png").stat().st_size > 0


def test_front_files_hold_the_one_shot_front_and_the_plot_both(tmp_path: Path, monkeypatch) -> None:
    from datetime import datetime, timezone

    from prunetune.orchestrator import callbacks
    from prunetune.orchestrator.results import RECOVERED, ResultLog, make_row
    from prunetune.search_spaces.subnet import SubnetConfig

    model = dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64,
                 num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    rows = []
    for i, embed in enumerate((8, 16, 24, 48)):
        subnet = SubnetConfig(layers=(0, 1), kv_heads=(2, 2), q_per_kv=(3, 3), mlp=(64, 64),
                              embed=embed)
        rows.append(make_row("run", f"t{i}", subnet, model, {"perplexity": 100.0 / embed},
                             "ok", None, "g0", t0, t0, 64))
        rows.append(make_row("run", f"r{i}", subnet, model, {"perplexity": 10.0 / embed},
                             "ok", None, "g0", t0, t0, 64, stage=RECOVERED, trained_tokens=64))
    ResultLog(str(tmp_path)).append(rows)
    drawn = {}

    def plot(*args, recovered=None, **kwargs):
        drawn["recovered"] = recovered
        plot_front(*args, recovered=recovered, **kwargs)

    monkeypatch.setattr(callbacks, "plot_front", plot)
    summary = callbacks.write_front_files(str(tmp_path), {"params": "min", "perplexity": "min"},
                                          None)
    front = pd.read_parquet(tmp_path / "front.parquet")
    assert summary["front_size"] == 4 and summary["rows"] == 4
    assert sorted(front["trial_id"]) == ["t0", "t1", "t2", "t3"]
    assert (front["stage"] == "oneshot").all() and front["trained_tokens"].isna().all()
    assert sorted(drawn["recovered"]["trial_id"]) == ["r0", "r1", "r2", "r3"]
    assert (tmp_path / "front.png").stat().st_size > 10_000
