"""The Pareto aggregator: which evaluated sub-networks are worth keeping.

Any number of objectives, each minimised or maximised, taken from result-log columns.
Only finished trials with status "ok", scored at full fidelity (not the first-window
screens of a multi-fidelity search) and with a value for every objective take part. The
front is recomputed from the whole log (the log is the truth; the front is a view), fronts
of several runs merge into one, and `front.parquet` carries the result-log columns plus
`rank` and `crowding`.

Non-dominated sorting and the hypervolume come from moocore (C, O(n log n) for 2-3
objectives); `benchmarks/pareto.py` measures it against plain numpy and pymoo.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping

import moocore
import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunetune.orchestrator.results import (
    RESULT_SCHEMA,
    atomic_write,
    open_filesystem,
    schema_metadata,
    table_bytes,
)

DIRECTIONS = ("min", "max")
FRONT_COLUMNS_DESCRIPTION = (
    "rank (int64): non-dominated sorting rank over the objectives; 0 = the Pareto front",
    "crowding (double): NSGA-II crowding distance within the row's rank; inf at the extremes",
)


def objective_matrix(df: pd.DataFrame, objectives: Mapping[str, str]) -> np.ndarray:
    """The objectives of every row as a float matrix to minimise ("max" columns negated)."""
    if not objectives:
        raise ValueError("objectives: name at least one column with direction 'min' or 'max'")
    columns = []
    for name, direction in objectives.items():
        if direction not in DIRECTIONS:
            raise ValueError(f"objective {name!r}: direction must be 'min' or 'max', got {direction!r}")
        if name not in df.columns:
            raise ValueError(
                f"objective {name!r}: no such column; columns are {', '.join(map(str, df.columns))}"
            )
        try:
            values = df[name].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"objective {name!r}: column is not numeric ({exc})") from exc
        columns.append(-values if direction == "max" else values)
    return np.column_stack(columns)


def _check_matrix(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"objective matrix must be 2-D (rows x objectives), got shape {F.shape}")
    if np.isnan(F).any():
        raise ValueError("objective matrix contains NaN; drop rows without every objective first")
    return F


def non_dominated_ranks(F: np.ndarray) -> np.ndarray:
    """Pareto rank of every row of a minimisation matrix: 0 = not dominated by any row.

    Equal rows get equal ranks.
    """
    F = _check_matrix(F)
    if len(F) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(moocore.pareto_rank(F), dtype=np.int64)


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the minimised objective values `a` dominate `b`: no worse in any objective
    and better in one (one pair; `non_dominated_ranks` sorts a whole matrix)."""
    return bool((a <= b).all() and (a < b).any())


def _front_mask(F: np.ndarray) -> np.ndarray:
    """Rows not dominated by any row (duplicates of a front row are all kept)."""
    F = _check_matrix(F)
    if len(F) == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(F, keep_weakly=True), dtype=bool)


def crowding_distance(F: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of every row of one front (a set of mutually
    non-dominated points): the normalised perimeter of the box spanned by its neighbours
    along each objective; inf for the extremes, so they are always preferred.
    """
    F = _check_matrix(F)
    return _crowding_by_rank(F, np.zeros(len(F), dtype=np.int64))


def _crowding_by_rank(F: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Crowding distance of every row within its own rank, for all ranks at once.

    Ties keep the input order (stable sorts), so equal inputs give equal distances.
    """
    n, m = F.shape
    distance = np.zeros(n)
    if n == 0:
        return distance
    for j in range(m):
        order = np.lexsort((F[:, j], ranks))
        values, groups = F[order, j], ranks[order]
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        ends = np.r_[starts[1:], n] - 1
        with np.errstate(divide="ignore", invalid="ignore"):  # inf - inf where values are infinite
            span = np.repeat(values[ends] - values[starts], ends - starts + 1)
            gap = np.zeros(n)
            gap[1:-1] = values[2:] - values[:-2]
            usable = np.isfinite(span) & (span > 0)
            contribution = np.where(usable, gap / span, 0.0)
        contribution[starts] = contribution[ends] = np.inf
        distance[order] += contribution
    return distance


def hypervolume(F: np.ndarray, ref: Iterable[float]) -> float:
    """Volume dominated by the rows of a minimisation matrix and bounded by `ref`.

    `ref` is in the same (minimisation) space as `F`: negate the bound of a "max"
    objective. Rows that do not strictly dominate `ref` add nothing.
    """
    F = _check_matrix(F)
    ref = np.asarray(list(ref), dtype=np.float64)
    if ref.shape != (F.shape[1],):
        raise ValueError(f"ref: needs one value per objective ({F.shape[1]}), got {ref.tolist()}")
    if len(F) == 0:
        return 0.0
    return float(moocore.hypervolume(F, ref=ref))


def full_fidelity(df: pd.DataFrame) -> np.ndarray:
    """Which rows are full evaluations, not multi-fidelity screens on the first windows.

    A row's `fidelity` is the number of windows it was scored on; the full fidelity of a
    run is the largest in its rows (its dense model is always scored on every window). A
    row without one (a log written before multi-fidelity) is a full evaluation.
    """
    if "fidelity" not in df.columns:
        return np.ones(len(df), dtype=bool)
    fidelity = pd.to_numeric(df["fidelity"]).astype(float)
    runs = df["run_id"] if "run_id" in df.columns else pd.Series(0, index=df.index)
    full = fidelity.groupby(runs.to_numpy(), dropna=False).transform("max")
    return (fidelity.isna() | (fidelity >= full)).to_numpy(dtype=bool)


def _rankable(df: pd.DataFrame, objectives: Mapping[str, str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The ok full-fidelity rows with every objective present, and their objective matrix."""
    if "status" not in df.columns:
        raise ValueError("result rows have no 'status' column; pass result-log rows")
    F = objective_matrix(df, objectives)
    keep = ((df["status"] == "ok").to_numpy(dtype=bool) & full_fidelity(df)
            & ~np.isnan(F).any(axis=1))
    return df.loc[keep].drop(columns=["rank", "crowding"], errors="ignore"), F[keep]


def _canonical_order(df: pd.DataFrame, F: np.ndarray) -> np.ndarray:
    """Row order best-first by the objectives in turn, then by config hash and trial."""
    keys = {f"_objective_{i}": F[:, i] for i in range(F.shape[1])}
    for name in ("config_hash", "run_id", "trial_id"):
        if name in df.columns:
            keys[name] = df[name].astype("string").to_numpy(na_value="")
    frame = pd.DataFrame(keys)
    return frame.sort_values(list(keys), kind="mergesort").index.to_numpy()


def _with_rank(df: pd.DataFrame, F: np.ndarray, ranks: np.ndarray) -> pd.DataFrame:
    order = _canonical_order(df, F)
    df, F, ranks = df.iloc[order], F[order], ranks[order]
    out = df.assign(rank=ranks, crowding=_crowding_by_rank(F, ranks))
    return out.sort_values("rank", kind="mergesort").reset_index(drop=True)


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The non-dominated ok rows, with `rank` (0) and `crowding`, best first in the
    first objective."""
    rows, F = _rankable(df, objectives)
    mask = _front_mask(F)
    return _with_rank(rows.loc[mask], F[mask], np.zeros(int(mask.sum()), dtype=np.int64))


def rank_all(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """Every ok row that has all objectives, with its `rank` and its `crowding` within
    that rank; sorted by rank, then best first in the first objective."""
    rows, F = _rankable(df, objectives)
    return _with_rank(rows, F, non_dominated_ranks(F))


def merge_fronts(frames: Iterable[pd.DataFrame], objectives: Mapping[str, str]) -> pd.DataFrame:
    """One front from the logs or fronts of several runs.

    A config measured with the same objective values in several runs counts once (the
    row with the smallest run_id, trial_id is kept), so merging is order-independent and
    idempotent. Columns: the result-log columns in schema order, other columns by name,
    then rank and crowding.
    """
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        raise ValueError("merge_fronts: no rows to merge")
    rows, F = _rankable(pd.concat(frames, ignore_index=True), objectives)
    order = _canonical_order(rows, F)
    rows = rows.iloc[order].reset_index(drop=True)
    key = pd.DataFrame(F[order]).assign(config_hash=rows.get("config_hash"))
    rows = rows.loc[~key.duplicated().to_numpy()]
    front = pareto_front(rows, objectives)
    return front[_column_order(front.columns)]


def _column_order(columns: Iterable[str]) -> list[str]:
    columns = list(columns)
    fixed = [name for name in RESULT_SCHEMA.names if name in columns]
    tail = [name for name in ("rank", "crowding") if name in columns]
    rest = sorted(set(columns) - set(fixed) - set(tail))
    return fixed + rest + tail


def write_front(df: pd.DataFrame, path: str) -> None:
    """Write a front (or ranked rows) as one Parquet file, atomically; `path` may be a URI.

    Result-log columns keep their log types, and the schema description readers rely on
    is stored in the file's metadata with lines for rank and crowding added.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    for field in RESULT_SCHEMA:
        if field.name in table.column_names:
            index = table.schema.get_field_index(field.name)
            table = table.set_column(index, field, table.column(index).cast(field.type))
    metadata = {**(table.schema.metadata or {}), **schema_metadata(FRONT_COLUMNS_DESCRIPTION)}
    fs, target = open_filesystem(path)
    atomic_write(fs, target, table_bytes(table.replace_schema_metadata(metadata)))


def plot_front(
    all_rows: pd.DataFrame,
    front: pd.DataFrame,
    objectives: Mapping[str, str],
    path: str,
    dense: Mapping[str, Any] | None = None,
    recovered: pd.DataFrame | None = None,
) -> None:
    """A PNG of the first two objectives: every evaluated point in grey, the front
    highlighted with its attainment staircase, the front of the recovered sub-networks
    (when given and not empty) in a second colour with its own, and the dense model as a
    labelled star. `path` may be a URI.
    """
    if len(objectives) < 2:
        raise ValueError("plot_front: needs at least two objectives to draw, got "
                         f"{list(objectives)}")
    (x_name, x_dir), (y_name, y_dir) = list(objectives.items())[:2]
    pair = {x_name: x_dir, y_name: y_dir}
    rows, everything = _rankable(all_rows, pair)
    both = recovered is not None and len(recovered) > 0
    fronts = [(_rankable(front, pair)[1], "tab:blue", "one-shot front" if both else "Pareto front")]
    if both:
        fronts.append((_rankable(recovered, pair)[1], "tab:orange", "recovered front"))

    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter(*_original(everything, pair), s=10, c="0.7", label=f"evaluated ({len(rows)})")
    for points, colour, label in fronts:
        _draw_front(ax, points, pair, colour, f"{label} ({len(points)})")
    if dense is not None:
        missing = [name for name in pair if name not in dense]
        if missing:
            raise ValueError(f"plot_front: the dense row has no value for {missing}")
        point = [float(dense[x_name]), float(dense[y_name])]
        ax.scatter(*point, marker="*", s=220, c="tab:red", zorder=4, label="dense model")
        ax.annotate("dense", point, textcoords="offset points", xytext=(8, 6))
    plotted = np.vstack([_original(everything, pair).T,
                         *(_original(points, pair).T for points, _, _ in fronts)])
    for axis, values in ((ax.xaxis, plotted[:, 0]), (ax.yaxis, plotted[:, 1])):
        if _spans_decades(values):
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
    ax.set_xlabel(f"{x_name} ({x_dir})")
    ax.set_ylabel(f"{y_name} ({y_dir})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    fs, target = open_filesystem(path)
    atomic_write(fs, target, buffer.getvalue())


def _draw_front(ax: Any, points: np.ndarray, pair: Mapping[str, str], colour: str,
                label: str) -> None:
    """A front's points (minimisation values) and its attainment staircase."""
    ax.scatter(*_original(points, pair), s=24, c=colour, zorder=3, label=label)
    staircase = points[_front_mask(points)] if len(points) else points
    staircase = staircase[np.lexsort((staircase[:, 1], staircase[:, 0]))]
    x_dir = next(iter(pair.values()))
    if x_dir == "max":
        staircase = staircase[::-1]
    ax.step(*_original(staircase, pair), where="post" if x_dir == "min" else "pre", c=colour)


def _original(F: np.ndarray, pair: Mapping[str, str]) -> np.ndarray:
    """Minimisation values back in the columns' own units, as (x, y) rows."""
    signs = np.array([-1.0 if d == "max" else 1.0 for d in pair.values()])
    return (F[:, :2] * signs).T


def _spans_decades(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return len(finite) > 1 and finite.min() > 0 and math.log10(finite.max() / finite.min()) > 1
