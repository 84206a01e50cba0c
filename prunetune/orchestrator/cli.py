"""The `prunetune` command: search, resume, front, export, recover, train-supernet, plan."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from prunetune.orchestrator.console import LOG_FILE, quiet_output
from prunetune.orchestrator.spec import Spec, SpecError, default_spec, load_spec
from prunetune.training.settings import (
    DEFAULT_TRAINING_TEXT, STRATEGIES, TEACHER_PLACEMENTS, ZERO_STAGES, DistillSettings,
    SupernetSettings,
)

DISTILL = DistillSettings()
SUPERNET = SupernetSettings()

FRONT_COLUMNS = ("config_hash", "num_layers", "q_heads", "mlp", "embed", "params")
ZERO_CHOICES = ("auto", *(str(stage) for stage in ZERO_STAGES))
ZERO_HELP = ("DeepSpeed ZeRO stage: auto (the default) takes the fastest whose training state "
             "fits the GPUs (0: a copy on every GPU, 2: gradients and AdamW states split, "
             "3: the weights split too)")
VERBOSE_HELP = (f"show Ray's, Tune's and the libraries' output on the terminal (by default it "
                f"goes to {LOG_FILE} in the run directory)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunetune",
        description="Search the Pareto-optimal pruned sub-networks of a language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    search = sub.add_parser("search", help="run a search (no SPEC: the small SmolLM2 default)",
                            description="Run the search a YAML spec describes. Without a spec, "
                                        "a small search on SmolLM2-135M on CPU.")
    search.add_argument("spec", nargs="?", help="YAML spec file (default: built-in spec)")
    search.add_argument("--run-dir", help="where results go (overrides the spec's run_dir)")
    search.add_argument("--address", help="Ray cluster address (overrides the spec's address)")
    search.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    resume = sub.add_parser("resume", help="finish a stopped search",
                            description="Finish a search that was stopped: nothing evaluated "
                                        "twice, nothing lost.")
    resume.add_argument("run_dir")
    resume.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    front = sub.add_parser("front", help="print (and merge, plot) the front of one or more runs",
                           description="The Pareto front of one run, or of several merged.")
    front.add_argument("run_dirs", nargs="+")
    front.add_argument("--plot", help="write a PNG of the front here")
    front.add_argument("--merge", help="write the merged front as Parquet here")

    export = sub.add_parser("export", help="write a front point as a Hugging Face checkpoint",
                            description="Write the sub-network at row N of `prunetune front "
                                        "RUN_DIR` as safetensors + config.")
    export.add_argument("run_dir")
    export.add_argument("--pick", type=int, required=True, help="row of the front table")
    export.add_argument("--out", required=True, help="output directory")

    recover = sub.add_parser(
        "recover", help="distil front points back to quality",
        description="Distil sub-networks of a run's front from the dense model (knowledge "
                    "distillation on training text). --pick N --out DIR: the sub-network at row "
                    "N of `prunetune front RUN_DIR`, written as safetensors + config. --front: "
                    "every point of the front, spread over the cluster like evaluations, each "
                    "saved to RUN_DIR/recovered/<config_hash>/, measured again and logged with "
                    "stage recovered; points recovered before on the same budget are skipped.")
    recover.add_argument("run_dir")
    recover.add_argument("--pick", type=int, help="row of the front table (with --out)")
    recover.add_argument("--out", help="output directory of --pick (its checkpoint/ folder "
                                       "lets a killed run resume)")
    recover.add_argument("--front", action="store_true",
                         help="recover every point of the front (instead of --pick)")
    recover.add_argument("--tokens", type=int, default=DISTILL.tokens,
                         help=f"training tokens per point (default {DISTILL.tokens:,})")
    recover.add_argument("--seq-len", type=int, default=DISTILL.seq_len,
                         help=f"tokens per training window (default {DISTILL.seq_len})")
    recover.add_argument("--lora", type=int, default=0, metavar="RANK",
                         help="train LoRA adapters of this rank instead of every weight")
    recover.add_argument("--data", default=DEFAULT_TRAINING_TEXT,
                         help="training text: gutenberg (shipped), a file, a folder of .txt "
                              "files, or an HF dataset name/config:split (default gutenberg)")
    recover.add_argument("--workers", type=int, default=1,
                         help="with --pick: train on this many GPUs (Ray Train workers, "
                              "DeepSpeed ZeRO), the run's Ray cluster or a local one")
    recover.add_argument("--zero", default="auto", choices=ZERO_CHOICES,
                         help=f"with --workers: {ZERO_HELP}")
    recover.add_argument("--teacher", default="whole", choices=TEACHER_PLACEMENTS,
                         help="with --workers: the dense teacher whole on every GPU (the "
                              "default), or partitioned over them (ZeRO-3: each holds 1/N of "
                              "it), for a teacher that does not fit one GPU")
    recover.add_argument("--verbose", action="store_true", help=f"with --front: {VERBOSE_HELP}")

    supernet = sub.add_parser(
        "train-supernet", help="fine-tune the model as a super-network of the spec's space",
        description="Train the spec's model as a weight-sharing super-network of its search "
                    "space (sandwich rule: each step trains the largest sub-network on the text "
                    "and the smallest and random ones to match it), then write it to DIR as a "
                    "Hugging Face checkpoint that a spec's `model:` can name; its search keeps "
                    "the importance order it was trained in. Started again, a killed run "
                    "resumes from DIR/checkpoint/.")
    supernet.add_argument("spec", help="YAML spec file (model, search space, evaluation)")
    supernet.add_argument("--out", required=True, help="output directory")
    supernet.add_argument("--tokens", type=int, default=DISTILL.tokens,
                          help=f"training tokens (default {DISTILL.tokens:,})")
    supernet.add_argument("--seq-len", type=int, default=DISTILL.seq_len,
                          help=f"tokens per training window (default {DISTILL.seq_len})")
    supernet.add_argument("--strategy", default=SUPERNET.strategy, choices=STRATEGIES,
                          help="which sub-networks each step trains: sandwich (largest, "
                               "smallest, random ones), random, ats, random_linear, standard "
                               f"(largest only) (default {SUPERNET.strategy})")
    supernet.add_argument("--random", type=int, default=SUPERNET.random_count,
                          help="random sub-networks per step (default "
                               f"{SUPERNET.random_count})")
    supernet.add_argument("--top-k", type=int, default=64,
                          help="size of the largest sub-network's distribution the others "
                               "learn (default 64)")
    supernet.add_argument("--data", default=DEFAULT_TRAINING_TEXT,
                          help="training text, as for recover (default gutenberg)")
    supernet.add_argument("--workers", type=int, default=0,
                          help="train on this many GPUs (Ray Train workers, DeepSpeed ZeRO), "
                               "the spec's Ray cluster or a local one (default: this process)")
    supernet.add_argument("--zero", default="auto", choices=ZERO_CHOICES,
                          help=f"with --workers: {ZERO_HELP}")

    plan = sub.add_parser("plan", help="GPUs per evaluator and evaluators per cluster",
                          description="How many GPUs one evaluator of the spec's model needs, "
                                      "and how many evaluators a cluster runs.")
    plan.add_argument("spec", help="YAML spec file, or a model config.json / model directory")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SpecError, FileNotFoundError, ValueError) as exc:
        print(f"prunetune {args.command}: {exc}", file=sys.stderr)
        return 2


def _search(args: argparse.Namespace) -> int:
    from prunetune.orchestrator.preflight import check_inputs
    from prunetune.orchestrator.search import run_search

    spec = load_spec(args.spec) if args.spec else default_spec()
    overrides = {k: v for k, v in (("run_dir", args.run_dir), ("address", args.address)) if v}
    spec = load_spec({**spec.model_dump(mode="json"), **overrides}).with_run_dir()
    check_inputs(spec, args.spec or "default spec")
    with _output(spec.run_dir, args.verbose):
        outcome = run_search(spec)
    _print_front(outcome.front, dict(spec.objectives))
    print(f"\n{outcome.rows} results in {outcome.run_dir}/results/")
    print(f"front: {outcome.run_dir}/front.parquet  plot: {outcome.run_dir}/front.png")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from prunetune.orchestrator.search import resume_search

    with _output(args.run_dir, args.verbose):
        outcome = resume_search(args.run_dir)
    _print_front(outcome.front, run_objectives(args.run_dir))
    print(f"\nfront: {outcome.run_dir}/front.parquet")
    return 0


@contextmanager
def _output(run_dir: str, verbose: bool) -> Iterator[None]:
    """The search's output: all on the terminal (`--verbose`), or only prunetune's lines
    and progress bar there and the rest in the run's log (for a bucket run directory,
    `<name>.log` in the current folder). Ray is shut down inside, so its exit messages go
    to the log too."""
    import ray

    if verbose:
        yield
        return
    log = Path(run_dir) / LOG_FILE if "://" not in run_dir else Path(f"{Path(run_dir).name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with quiet_output(str(log)):
        try:
            yield
        finally:
            ray.shutdown()
    print(f"log: {log}")


def run_objectives(run_dir: str) -> dict[str, str]:
    """The objectives of a run, from the spec it saved."""
    from prunetune.orchestrator.run_record import run_spec

    return dict(run_spec(run_dir).objectives)


def merged_front(run_dirs: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """All one-shot rows and the merged front of several runs (which must share objectives)."""
    from prunetune.orchestrator.pareto import merge_fronts
    from prunetune.orchestrator.results import ONESHOT, ResultLog

    objectives = run_objectives(run_dirs[0])
    for run_dir in run_dirs[1:]:
        if run_objectives(run_dir) != objectives:
            raise ValueError(f"{run_dir}: objectives differ from {run_dirs[0]}'s {objectives}")
    logs = [ResultLog(run_dir).read(stage=ONESHOT) for run_dir in run_dirs]
    return pd.concat(logs, ignore_index=True), merge_fronts(logs, objectives), objectives


def recovered_front(run_dirs: Sequence[str], objectives: dict[str, str]) -> pd.DataFrame | None:
    """The merged front of the runs' recovered rows; None when they have none."""
    from prunetune.orchestrator.pareto import merge_fronts
    from prunetune.orchestrator.results import RECOVERED, ResultLog

    logs = [ResultLog(run_dir).read(stage=RECOVERED) for run_dir in run_dirs]
    return merge_fronts(logs, objectives) if any(len(log) for log in logs) else None


def _front(args: argparse.Namespace) -> int:
    from prunetune.orchestrator.pareto import plot_front, write_front
    from prunetune.orchestrator.results import DENSE_TRIAL

    rows, front, objectives = merged_front(args.run_dirs)
    _print_front(front, objectives)
    if args.merge:
        write_front(front, args.merge)
        print(f"merged front: {args.merge}")
    if args.plot:
        dense = rows[(rows["trial_id"] == DENSE_TRIAL) & (rows["status"] == "ok")].to_dict("records")
        plot_front(rows, front, objectives, args.plot, dense=dense[0] if dense else None,
                   recovered=recovered_front(args.run_dirs, objectives))
        print(f"plot: {args.plot}")
    return 0


def _print_front(front: pd.DataFrame, objectives: dict[str, str]) -> None:
    if front.empty:
        print("no successful evaluation yet: the front is empty")
        return
    columns = list(dict.fromkeys([*objectives, *FRONT_COLUMNS]))
    _show(front[[c for c in columns if c in front.columns]].reset_index(drop=True))


def _show(table: pd.DataFrame) -> None:
    """Print a table of results, numbers to 4 significant digits."""
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string())


def _front_pick(run_dir: str, pick: int) -> tuple[Any, int]:
    """The sub-network at row `pick` of a run's front, and its parameter count."""
    from prunetune.search_spaces.subnet import SubnetConfig

    _, front, _ = merged_front([run_dir])
    if not 0 <= pick < len(front):
        raise ValueError(f"--pick {pick}: the front has rows 0..{len(front) - 1}")
    row = front.iloc[pick]
    return SubnetConfig.from_json(row["config_json"]), int(row["params"])


def _dense_evaluator(run_dir: str, device: str) -> Any:
    """The run's dense model, sorted by importance as its search saw it, on `device`."""
    from prunetune.evaluators.evaluator import Evaluator
    from prunetune.orchestrator.run_record import run_spec

    settings = run_spec(run_dir).evaluator_settings()
    return Evaluator(replace(settings, device=device, tasks=()))


def _saved(out: Path, subnet: Any, params: int) -> str:
    """How to load what was written to `out`."""
    if subnet.is_uniform:
        return (f"wrote {out} ({params:,} parameters): "
                f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return f"wrote {out}: per-layer widths, load with prunetune.evaluators.surgery.load_pruned"


def _export(args: argparse.Namespace) -> int:
    from prunetune.evaluators.surgery import save_pruned

    subnet, params = _front_pick(args.run_dir, args.pick)
    evaluator = _dense_evaluator(args.run_dir, "cpu")
    out = save_pruned(evaluator.model, subnet, args.out, evaluator.input_norms)
    evaluator.tokenizer.save_pretrained(out)
    print(_saved(out, subnet, params))
    return 0


def _recover(args: argparse.Namespace) -> int:
    settings = _recover_settings(args)
    return _recover_front(args, settings) if args.front else _recover_pick(args, settings)


def _recover_settings(args: argparse.Namespace) -> DistillSettings:
    """The distillation settings of `recover`'s arguments, once they are known to combine."""
    if args.front == (args.pick is not None):
        raise ValueError("give --pick N --out DIR (one front point) or --front (every point)")
    if args.front and args.out:
        raise ValueError("--out goes with --pick; --front writes every point to "
                         "RUN_DIR/recovered/<config_hash>/")
    if args.pick is not None and not args.out:
        raise ValueError(f"--pick {args.pick} needs --out DIR")
    if args.workers < 1 or (args.front and args.workers > 1):
        raise ValueError(f"--workers {args.workers}: a positive count, with --pick "
                         "(--front trains each point on one of the run's evaluators' devices)")
    if args.teacher != "whole" and args.workers < 2:
        raise ValueError(f"--teacher {args.teacher} partitions the teacher over the workers: "
                         "give --workers N of 2 or more")
    return DistillSettings(tokens=args.tokens, seq_len=args.seq_len, lora_rank=args.lora)


def _recover_pick(args: argparse.Namespace, settings: DistillSettings) -> int:
    if args.workers > 1:
        return _recover_on_workers(args, settings)
    from prunetune.evaluators.perplexity import perplexity
    from prunetune.evaluators.surgery import extract
    from prunetune.orchestrator.recovery import distil_subnet, save_recovered

    subnet, params = _front_pick(args.run_dir, args.pick)
    evaluator = _dense_evaluator(args.run_dir, "auto")
    student = extract(evaluator.model, subnet, evaluator.input_norms)
    batch = evaluator.settings.batch_size
    before = perplexity(student, evaluator.windows, batch)["perplexity"]
    out = Path(args.out)
    result = distil_subnet(evaluator, student, settings, args.data, out / "checkpoint")
    after = perplexity(student, evaluator.windows, batch)["perplexity"]
    save_recovered(student, subnet, evaluator.tokenizer, out)
    print(f"distilled on {result.tokens:,} tokens of {args.data} in {result.seconds:.0f} s: "
          f"perplexity on the run's evaluation windows {before:.4g} -> {after:.4g}")
    print(_saved(out, subnet, params))
    return 0


def _recover_on_workers(args: argparse.Namespace, settings: DistillSettings) -> int:
    from prunetune.orchestrator.recovery import recover_on_workers

    subnet, params = _front_pick(args.run_dir, args.pick)
    result = recover_on_workers(args.run_dir, subnet, settings, args.data, args.out,
                                args.workers, _zero_stage(args.zero), args.teacher)
    print(f"distilled on {result.tokens:,} tokens of {args.data} by {args.workers} workers "
          f"(ZeRO-{result.zero_stage}, teacher {args.teacher}) in "
          f"{result.seconds:.0f} s: loss {result.losses[0]:.4g} -> {result.final_loss:.4g}")
    print(_saved(Path(args.out), subnet, params))
    return 0


def _zero_stage(choice: str) -> int | None:
    """The ZeRO stage of a `--zero` choice; None lets the workers choose."""
    return None if choice == "auto" else int(choice)


def _recover_front(args: argparse.Namespace, settings: DistillSettings) -> int:
    from prunetune.orchestrator.recovery import plan_recovery, run_recovery

    plan = plan_recovery(args.run_dir, settings, args.data)
    with _output(plan.run_dir, args.verbose):
        outcome = run_recovery(plan)
    _show(outcome.table)
    print(f"\n{outcome.recovered} front points recovered now, {outcome.skipped} before, "
          f"{len(outcome.failed)} failed")
    for config_hash, error in outcome.failed.items():
        print(f"{config_hash}: {error}", file=sys.stderr)
    print(f"models: {plan.run_dir}/recovered/<config_hash>/  plot: {plan.run_dir}/front.png")
    return 1 if outcome.failed else 0


def _train_supernet(args: argparse.Namespace) -> int:
    from prunetune.orchestrator.supernet import train_spec_supernet

    settings = DistillSettings(tokens=args.tokens, seq_len=args.seq_len, top_k=args.top_k)
    strategy = SupernetSettings(args.strategy, args.random)
    spec = load_spec(args.spec)
    result = train_spec_supernet(spec, args.out, settings, strategy, args.data, args.workers,
                                 _zero_stage(args.zero))
    print(f"trained the {spec.search_space.preset} space's super-network ({args.strategy}) on "
          f"{result.tokens:,} tokens of {args.data} in {result.seconds:.0f} s: loss "
          f"{result.losses[0]:.4g} -> {result.final_loss:.4g}")
    print(f"wrote {args.out}: name it as a spec's model to search it")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from prunetune.cluster.plan import load_config_file, model_config_path, plan_evaluators

    path = Path(args.spec)
    if path.suffix in (".yaml", ".yml"):
        spec: Spec = load_spec(path)
        config = load_config_file(model_config_path(spec.model))
        dtype, seq_len = spec.dtype, spec.evaluation.seq_len
        batch = None if spec.evaluation.batch_size == "auto" else spec.evaluation.batch_size
    else:
        config, dtype, seq_len, batch = load_config_file(path), "bfloat16", 2048, 1
    plan = plan_evaluators(config, gpu_memory_gib=args.gpu_memory, nodes=args.nodes,
                           gpus_per_node=args.gpus_per_node, dtype=dtype, seq_len=seq_len,
                           batch_size=batch)
    print(plan.describe())
    return 0


COMMANDS = {"search": _search, "resume": _resume, "front": _front, "export": _export,
            "recover": _recover, "train-supernet": _train_supernet, "plan": _plan}


if __name__ == "__main__":
    sys.exit(main())
