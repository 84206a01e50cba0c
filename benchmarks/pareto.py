"""Non-dominated sorting and hypervolume at the scale of a long search.

Times the Pareto front (non-dominated rows) and full Pareto ranks of uniformly random
points with plain vectorised numpy, moocore and pymoo, on growing prefixes of the same
data (1e3, 1e4, ... rows up to --rows). A method stops growing once a run exceeds the
budget, or when the growth measured so far projects its next size past the budget; the
table says which. Every result is checked against moocore's. Then times the
hypervolume of the resulting front. `prunetune.orchestrator.pareto` uses the fastest.

    python benchmarks/pareto.py [--rows 1000000] [--objectives 3] [--budget 120]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import moocore
import numpy as np
import pymoo
from pymoo.functions.compiled import non_dominated_sorting as pymoo_nds
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting


def numpy_front(F: np.ndarray) -> np.ndarray:
    """Mask of non-dominated rows: in lexicographic order, the first remaining row is on
    the front; drop every remaining row it dominates; repeat."""
    order = np.lexsort(F.T[::-1])
    points = F[order]
    alive = np.arange(len(points))
    keep = []
    while alive.size:
        head = points[alive[0]]
        keep.append(alive[0])
        rest = alive[1:]
        others = points[rest]
        dominated = (others >= head).all(axis=1) & (others > head).any(axis=1)
        alive = rest[~dominated]
    mask = np.zeros(len(F), dtype=bool)
    mask[order[keep]] = True
    return mask


def numpy_ranks(F: np.ndarray) -> np.ndarray:
    """Pareto ranks by peeling fronts with `numpy_front`."""
    ranks = np.full(len(F), -1, dtype=np.int64)
    remaining = np.arange(len(F))
    rank = 0
    while remaining.size:
        on_front = numpy_front(F[remaining])
        ranks[remaining[on_front]] = rank
        remaining = remaining[~on_front]
        rank += 1
    return ranks


def fronts_to_ranks(fronts: list, n: int) -> np.ndarray:
    ranks = np.full(n, -1, dtype=np.int64)
    for rank, front in enumerate(fronts):
        ranks[np.asarray(front, dtype=np.int64)] = rank
    return ranks


def index_mask(indices: object, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return mask


FRONT_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "numpy lexsort + greedy filter": numpy_front,
    "moocore.is_nondominated": lambda F: moocore.is_nondominated(F, keep_weakly=True),
    "pymoo find_non_dominated (Cython)": lambda F: index_mask(pymoo_nds.find_non_dominated(F), len(F)),
    "pymoo NonDominatedSorting, front only (wraps moocore)": lambda F: index_mask(
        NonDominatedSorting().do(F, only_non_dominated_front=True), len(F)),
}
RANK_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "numpy peel fronts": numpy_ranks,
    "moocore.pareto_rank": moocore.pareto_rank,
    "pymoo efficient_non_dominated_sort (Cython, ENS-SS)": lambda F: fronts_to_ranks(
        pymoo_nds.efficient_non_dominated_sort(F), len(F)),
    "pymoo fast_best_order_sort (Cython)": lambda F: fronts_to_ranks(
        pymoo_nds.fast_best_order_sort(F), len(F)),
    "pymoo NonDominatedSorting (wraps moocore)": lambda F: NonDominatedSorting().do(F, return_rank=True)[1],
}


@dataclass
class Row:
    task: str
    method: str
    rows: int
    seconds: float | None
    note: str


def sizes_up_to(n: int) -> list[int]:
    sizes = [10 ** k for k in range(3, int(math.log10(n)) + 1) if 10 ** k < n]
    return sizes + [n]


def timed(fn: Callable[[np.ndarray], np.ndarray], F: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = np.asarray(fn(F))
    return time.perf_counter() - start, result


def grow(task: str, method: str, fn: Callable, reference: Callable, data: np.ndarray,
         budget: float) -> Iterator[Row]:
    """Time `fn` on growing prefixes of `data` until the full size or the budget is reached."""
    history: list[tuple[int, float]] = []
    for n in sizes_up_to(len(data)):
        if history:
            projected = project(history, n)
            if projected > budget:
                last_n, last_s = history[-1]
                yield Row(task, method, n, None,
                          f"skipped: {last_n:,} rows took {last_s:.2f} s; measured growth "
                          f"projects {projected:,.0f} s > budget {budget:.0f} s")
                return
        part = np.ascontiguousarray(data[:n])
        seconds, result = timed(fn, part)
        expected = reference(part)
        agrees = result.shape == expected.shape and np.allclose(result, expected, rtol=1e-12, atol=0)
        history.append((n, seconds))
        note = "agrees with moocore" if agrees else "DISAGREES with moocore"
        if seconds > budget:
            yield Row(task, method, n, seconds, f"{note}; over budget {budget:.0f} s, stopped")
            return
        yield Row(task, method, n, seconds, note)


def memoised(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """`fn` computed once per prefix length (every method is checked on the same prefixes)."""
    cache: dict[int, np.ndarray] = {}

    def call(F: np.ndarray) -> np.ndarray:
        if len(F) not in cache:
            cache[len(F)] = np.asarray(fn(F))
        return cache[len(F)]

    return call


def project(history: list[tuple[int, float]], n: int) -> float:
    """Seconds at n rows, extrapolating the growth exponent of the last two sizes (>= 1)."""
    last_n, last_s = history[-1]
    exponent = 2.0
    if len(history) > 1 and history[-2][1] > 0.01:
        prev_n, prev_s = history[-2]
        exponent = max(1.0, math.log(last_s / prev_s) / math.log(last_n / prev_n))
    return last_s * (n / last_n) ** exponent


def print_header() -> None:
    header = f"{'task':<6} {'method':<56} {'rows':>10} {'seconds':>9}  note"
    print(header)
    print("-" * len(header), flush=True)


def print_row(r: Row) -> None:
    seconds = f"{r.seconds:9.3f}" if r.seconds is not None else f"{'-':>9}"
    print(f"{r.task:<6} {r.method:<56} {r.rows:>10,} {seconds}  {r.note}", flush=True)


def hypervolume_rows(front: np.ndarray, budget: float) -> Iterator[Row]:
    """Hypervolume of the benchmark's front, then of growing spherical fronts (every point
    non-dominated: the hard case), with the reference point 10% beyond the nadir."""
    methods = {
        "moocore.hypervolume": lambda P, ref: moocore.hypervolume(P, ref=ref),
        "pymoo HV (wraps moocore)": lambda P, ref: HV(ref_point=ref)(P),
    }
    ref = front.max(axis=0) + 0.1 * (front.max(axis=0) - front.min(axis=0))
    for method, fn in methods.items():
        seconds, value = timed(lambda P: fn(P, ref), front)
        yield Row("hv", f"{method}: the front above", len(front), seconds,
                  f"hv = {float(value):.6g}")
    sphere = spherical_front(100_000, front.shape[1])
    sphere_ref = np.full(front.shape[1], 1.1)
    reference = memoised(lambda P: np.array([moocore.hypervolume(P, ref=sphere_ref)]))
    for method, fn in methods.items():
        yield from grow("hv", f"{method}: spherical front",
                        lambda P: np.array([fn(P, sphere_ref)]), reference, sphere, budget)


def spherical_front(n: int, m: int) -> np.ndarray:
    """n mutually non-dominated points on the unit sphere's positive orthant (seed 1)."""
    points = np.abs(np.random.default_rng(1).standard_normal((n, m)))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--objectives", type=int, default=3)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds one call may take")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    F = np.random.default_rng(args.seed).random((args.rows, args.objectives))
    print(f"{args.rows:,} rows x {args.objectives} objectives, uniform [0, 1), seed {args.seed}; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.2f}; numpy {np.__version__}, "
          f"moocore {moocore.__version__}, pymoo {pymoo.__version__}")
    reference_front = memoised(FRONT_METHODS["moocore.is_nondominated"])
    reference_ranks = memoised(moocore.pareto_rank)
    front = F[reference_front(F)]
    measurements = itertools.chain(
        *(grow("front", method, fn, reference_front, F, args.budget)
          for method, fn in FRONT_METHODS.items()),
        *(grow("ranks", method, fn, reference_ranks, F, args.budget)
          for method, fn in RANK_METHODS.items()),
        hypervolume_rows(front, args.budget),
    )
    print_header()
    rows = []
    for row in measurements:
        print_row(row)
        rows.append(row)
    print(f"front size {len(front):,}; number of fronts {int(reference_ranks(F).max()) + 1}")
    for task in ("front", "ranks"):
        done = [r for r in rows if r.task == task and r.rows == args.rows and r.seconds is not None]
        if not done:
            print(f"fastest {task} at {args.rows:,} rows: none finished within the budget")
            continue
        best = min(done, key=lambda r: r.seconds)
        print(f"fastest {task} at {args.rows:,} rows: {best.method} ({best.seconds:.3f} s)")


if __name__ == "__main__":
    main()
