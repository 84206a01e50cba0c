"""The `prunetune` command, end to end on a tiny model with the real evaluator."""

import json
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.importance import SORTED_SCORES_FILE, ImportanceScores
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.orchestrator import search
from prunetune.orchestrator.cli import main
from prunetune.orchestrator.results import ResultLog
from prunetune.orchestrator.spec import default_spec, load_spec


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_tokenizer):
    """A finished search over a tiny random Llama (real evaluator, real data)."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    random_model(tiny_config("llama", vocab_size=49152, num_hidden_layers=4), seed=5).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    spec = root / "spec.yaml"
    spec.write_text(f"""
model: {model_dir}
run_dir: {root / 'run'}
search_space: {{preset: uniform, min_ratio: 0.5}}
algorithm: {{name: random, num_samples: 5, seed: 3}}
evaluation: {{seq_len: 32, windows: 2, batch_size: 2, calibration_samples: 2}}
""")
    try:
        assert main(["search", str(spec)]) == 0
    finally:
        ray.shutdown()
    return root


def test_search_writes_log_front_and_plot(tiny_run, capsys) -> None:
    rows = ResultLog(str(tiny_run / "run")).read()
    assert len(rows) == 6 and (rows["status"] == "ok").all()
    assert rows["perplexity"].notna().all() and rows["config_hash"].is_unique
    assert (tiny_run / "run" / "front.parquet").exists() and (tiny_run / "run" / "front.png").exists()


def test_front_prints_merges_and_plots(tiny_run, tmp_path, capsys) -> None:
    run = str(tiny_run / "run")
    assert main(["front", run, run, "--merge", str(tmp_path / "m.parquet"),
                 "--plot", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "params" in out
    merged = pd.read_parquet(tmp_path / "m.parquet")
    assert len(merged) == len(pd.read_parquet(tiny_run / "run" / "front.parquet"))
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_export_writes_a_checkpoint_that_transformers_loads(tiny_run, tmp_path) -> None:
    front = pd.read_parquet(tiny_run / "run" / "front.parquet")
    pick = len(front) - 1
    assert main(["export", str(tiny_run / "run"), "--pick", str(pick), "--out", str(tmp_path / "x")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert sum(p.numel() for p in model.parameters()) == front.iloc[pick]["params"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_export_names_a_row_that_does_not_exist(tiny_run, capsys) -> None:
    assert main(["export", str(tiny_run / "run"), "--pick", "99", "--out", "/tmp/never"]) == 2
    assert "--pick 99: the front has rows 0.." in capsys.readouterr().err


def test_a_bad_spec_fails_before_ray_starts_naming_the_field(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluation: {seq_len: -1}\nalgorithm: {nam: random}\n")
    assert main(["search", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.seq_len" in err and "algorithm.nam" in err and str(bad) in err
    assert not ray.is_initialized()


def test_every_command_has_help() -> None:
    for command in ("search", "resume", "front", "export", "recover", "train-supernet", "plan"):
        out = subprocess.run([sys.executable, "-m", "prunetune.orchestrator.cli", command, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith(f"usage: prunetune {command}")


def _search_output(root, extra: list[str]) -> subprocess.CompletedProcess:
    """`prunetune search` of the tiny model's spec in a fresh process, as a user runs it."""
    spec = (root / "spec.yaml").read_text().replace(str(root / "run"), str(root / f"run{len(extra)}"))
    (root / "again.yaml").write_text(spec.replace("num_samples: 5", "num_samples: 2"))
    return subprocess.run([sys.executable, "-m", "prunetune.orchestrator.cli", "search",
                           str(root / "again.yaml"), *extra],
                          capture_output=True, text=True, timeout=600, check=True)


@pytest.mark.slow
def test_the_console_shows_prunetune_only_and_the_rest_goes_to_the_log(tiny_run) -> None:
    done = _search_output(tiny_run, [])
    shown = done.stdout + done.stderr
    for line in ("loading ", "loaded in ", "dense: perplexity", "searching 2 sub-networks",
                 "front: ", "log: "):
        assert line in shown
    for noise in ("Ray", "ray.", "Tune", "WARNING", "INFO", "Traceback"):
        assert noise not in shown, noise
    log = (tiny_run / "run0" / "prunetune.log").read_text()
    assert "Ray" in log
    verbose = _search_output(tiny_run, ["--verbose"])
    assert "Ray" in verbose.stdout + verbose.stderr
    assert not (tiny_run / "run1" / "prunetune.log").exists()


def test_recover_distils_a_front_point_and_exports_it(tiny_run, tmp_path, capsys) -> None:
    front = pd.read_parquet(tiny_run / "run" / "front.parquet")
    pick = len(front) - 1
    out = tmp_path / "recovered"
    assert main(["recover", str(tiny_run / "run"), "--pick", str(pick), "--out", str(out),
                 "--tokens", "1024", "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    assert "distilled on 1,024 tokens of gutenberg" in printed and "perplexity" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == front.iloc[pick]["params"]
    assert any((out / "checkpoint").iterdir())


@pytest.mark.slow
def test_recover_on_two_workers_exports_the_distilled_point(tiny_run, tmp_path, capsys) -> None:
    front = pd.read_parquet(tiny_run / "run" / "front.parquet")
    pick = len(front) - 1
    out = tmp_path / "recovered"
    try:
        assert main(["recover", str(tiny_run / "run"), "--pick", str(pick), "--out", str(out),
                     "--tokens", "1024", "--seq-len", "32", "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    assert ("distilled on 1,024 tokens of gutenberg by 2 workers (ZeRO-0, teacher whole)"
            in capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == front.iloc[pick]["params"]
    assert (out / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_recover_with_a_partitioned_teacher_exports_what_one_process_does(tiny_run, tmp_path,
                                                                          capsys) -> None:
    pick = len(pd.read_parquet(tiny_run / "run" / "front.parquet")) - 1
    common = ["recover", str(tiny_run / "run"), "--pick", str(pick), "--tokens", "1024",
              "--seq-len", "32"]
    assert main([*common, "--out", str(tmp_path / "alone")]) == 0
    try:
        assert main([*common, "--out", str(tmp_path / "partitioned"), "--workers", "2",
                     "--teacher", "partitioned"]) == 0
    finally:
        ray.shutdown()
    assert "by 2 workers (ZeRO-0, teacher partitioned)" in capsys.readouterr().out
    alone = AutoModelForCausalLM.from_pretrained(tmp_path / "alone").state_dict()
    partitioned = AutoModelForCausalLM.from_pretrained(tmp_path / "partitioned").state_dict()
    torch.testing.assert_close(partitioned, alone, rtol=1e-5, atol=1e-6)


def test_a_partitioned_teacher_needs_several_workers(tiny_run, tmp_path, capsys) -> None:
    assert main(["recover", str(tiny_run / "run"), "--pick", "0", "--out", str(tmp_path / "r"),
                 "--teacher", "partitioned"]) == 2
    assert "--teacher partitioned partitions the teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_train_supernet_writes_a_model_a_spec_can_name(tiny_run, tmp_path, capfd) -> None:
    out = tmp_path / "supernet"
    assert main(["train-supernet", str(tiny_run / "spec.yaml"), "--out", str(out),
                 "--tokens", "1024", "--seq-len", "32", "--top-k", "8",
                 "--strategy", "random", "--random", "3"]) == 0
    assert "super-network (random) on 1,024 tokens of gutenberg" in capfd.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and (out / "tokenizer_config.json").is_file()
    assert any((out / "checkpoint").iterdir())
    record = json.loads((out / "supernet.json").read_text())
    assert record["strategy"] == {"strategy": "random", "random_count": 3}
    assert record["trained_tokens"] == 1024 and record["base_model"] == load_spec(
        tiny_run / "spec.yaml").model
    # Searched, it keeps the order it was trained in: nothing is permuted again.
    settings = replace(load_spec(tiny_run / "spec.yaml").evaluator_settings(), model=str(out),
                       tasks=())
    evaluator = Evaluator(settings, "supernet-search")
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(evaluator.model.state_dict()[name], weight.to(
            evaluator.model.dtype), rtol=0, atol=0, msg=name)
    trained_order = ImportanceScores.load(out / SORTED_SCORES_FILE).layer_order()
    assert evaluator.info()["layer_order"] == trained_order
    spec = (tiny_run / "spec.yaml").read_text().replace(str(tiny_run / "model"), str(out))
    (tmp_path / "spec.yaml").write_text(spec.replace(str(tiny_run / "run"), str(tmp_path / "run"))
                                        .replace("num_samples: 5", "num_samples: 2"))
    try:
        assert main(["search", str(tmp_path / "spec.yaml")]) == 0
    finally:
        ray.shutdown()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["supernet"] == record and run["layer_order"] == trained_order
    assert main(["train-supernet", str(tiny_run / "spec.yaml"), "--out", str(out),
                 "--data", "wikitext2"]) == 2


@pytest.mark.slow
def test_train_supernet_on_two_workers_writes_the_same_folder(tiny_run, tmp_path) -> None:
    out = tmp_path / "supernet"
    try:
        assert main(["train-supernet", str(tiny_run / "spec.yaml"), "--out", str(out),
                     "--tokens", "1024", "--seq-len", "32", "--top-k", "8",
                     "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert (out / SORTED_SCORES_FILE).is_file() and (out / "tokenizer_config.json").is_file()
    record = json.loads((out / "supernet.json").read_text())
    assert record["workers"] == 2 and record["trained_tokens"] == 1024


def test_recover_refuses_evaluation_text(tiny_run, tmp_path, capsys) -> None:
    assert main(["recover", str(tiny_run / "run"), "--pick", "0", "--out", str(tmp_path / "r"),
                 "--data", "wikitext2"]) == 2
    assert "evaluation data" in capsys.readouterr().err


def test_search_without_a_spec_runs_the_built_in_search(monkeypatch, tmp_path) -> None:
    searched = []

    class Started(Exception):
        pass

    def run_search(spec):
        searched.append(spec)
        raise Started

    monkeypatch.setattr(search, "run_search", run_search)
    with pytest.raises(Started):
        main(["search", "--run-dir", str(tmp_path / "run")])
    (spec,) = searched
    assert spec.constraints == ["params >= 0.65 * dense"] and spec.algorithm.num_samples == 20
    assert spec == default_spec().model_copy(update={"run_dir": str(tmp_path / "run")})
