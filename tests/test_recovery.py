"""`prunetune recover RUN_DIR --front`: every front point distilled on Ray, measured again
and logged as a recovered row, on a tiny character-level model trained on text."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch

from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.model import tiny_config
from prunetune.orchestrator.cli import main
from prunetune.orchestrator.results import ONESHOT, RECOVERED, ResultLog, make_row
from prunetune.orchestrator.run_record import write_run_record, write_run_spec
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.trial import metric_columns
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.data import training_windows
from prunetune.training.settings import DistillSettings
from test_distill import trained_teacher

SEQ = 32
TOKENS = 16 * 1024
"""Sixteen optimizer steps of the default 32 windows, at 32 tokens a window."""
RATIOS = (1.0, 0.75, 0.5)


def char_tokenizer() -> object:
    """A Hugging Face tokenizer with one token per printable ASCII character (96 ids, the
    tiny models' vocabulary; anything else is the end-of-sequence token)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i): i for i in range(95)} | {"</s>": 95}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="</s>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>", unk_token="</s>")


def trained_model(tokenizer: object, steps: int = 80) -> torch.nn.Module:
    """A tiny Llama trained a little on the shipped corpus, so that pruning it loses something
    real and distillation wins some back."""
    text = training_windows(tokenizer, "gutenberg", SEQ)
    return trained_teacher(text, steps, tiny_config(num_hidden_layers=4))


def uniform(config: object, ratio: float) -> SubnetConfig:
    """Every layer, each width cut to `ratio`."""
    layers = config.num_hidden_layers
    return SubnetConfig(layers=tuple(range(layers)), kv_heads=(2,) * layers,
                        q_per_kv=(max(1, round(3 * ratio)),) * layers,
                        mlp=(round(64 * ratio),) * layers, embed=round(48 * ratio))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's directory, as a search leaves it: the spec, the record, and one-shot
    rows of the dense model and two narrower sub-networks measured by the real evaluator."""
    root = tmp_path_factory.mktemp("recover")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRUNETUNE_CACHE", str(root / "cache"))
        tokenizer = char_tokenizer()
        model_dir = root / "model"
        trained_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        run = root / "run"
        spec = load_spec({"model": str(model_dir), "run_dir": str(run),
                          "evaluation": {"seq_len": SEQ, "windows": 4, "batch_size": 2,
                                         "calibration_samples": 4},
                          "resources": {"evaluators": 2}})
        write_run_spec(str(run), spec)
        evaluator = Evaluator(spec.evaluator_settings())
        config = evaluator.model.config
        now = datetime.now(timezone.utc)
        rows = []
        for i, ratio in enumerate(RATIOS):
            subnet = uniform(config, ratio)
            result = evaluator.evaluate(subnet, spec.metrics_needed())
            rows.append(make_row("run", "dense" if ratio == 1.0 else f"t{i}", subnet,
                                 config.to_dict(), metric_columns(result), "ok", None,
                                 "evaluator-0", now, now, SEQ))
        ResultLog(str(run)).append(rows)
        write_run_record(str(run), {"run_id": "run", "model_config": config.to_dict(),
                                    "dense_hash": rows[0]["config_hash"]})
        yield run
    ray.shutdown()


def front_hashes(run: Path) -> list[str]:
    from prunetune.orchestrator.pareto import pareto_front

    front = pareto_front(ResultLog(str(run)).read(stage=ONESHOT),
                         {"perplexity": "min", "params": "min"})
    return sorted(front["config_hash"])


@pytest.mark.slow
def test_recover_front_distils_logs_and_skips_what_is_done(run_dir, capsys) -> None:
    run = str(run_dir)
    before = ResultLog(run).read()
    dense_hash = before.loc[before["trial_id"] == "dense", "config_hash"].item()
    front = front_hashes(run_dir)
    points = [h for h in front if h != dense_hash]
    assert points, "the tiny run's front has no pruned point"

    assert main(["recover", run, "--front", "--tokens", str(TOKENS), "--seq-len", str(SEQ)]) == 0
    out = capsys.readouterr().out
    assert "perplexity one-shot" in out and "perplexity recovered" in out
    assert f"{len(points)} front points recovered now, 0 before" in out

    log = ResultLog(run).read()
    recovered = log[log["stage"] == RECOVERED].set_index("config_hash")
    assert sorted(recovered.index) == sorted(points)
    assert (recovered["trained_tokens"] == TOKENS).all() and (recovered["status"] == "ok").all()
    oneshot = before.set_index("config_hash")
    for digest in points:
        assert recovered.loc[digest, "perplexity"] < oneshot.loc[digest, "perplexity"], digest
        assert recovered.loc[digest, "params"] == oneshot.loc[digest, "params"]
        folder = run_dir / "recovered" / digest
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
        assert not (folder / "checkpoint").exists()
    assert front_hashes(run_dir) == front
    assert sorted(pd.read_parquet(run_dir / "front.parquet")["config_hash"]) == front
    assert (run_dir / "front.png").stat().st_size > 10_000
    assert ResultLog(run).lookup(points[0])["stage"] == ONESHOT

    assert main(["recover", run, "--front", "--tokens", str(TOKENS), "--seq-len", str(SEQ)]) == 0
    assert f"0 front points recovered now, {len(points)} before" in capsys.readouterr().out
    assert len(ResultLog(run).read()) == len(log)

    plot = run_dir.parent / "both.png"
    assert main(["front", run, "--plot", str(plot)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + len(front) + 1
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    ([], "give --pick N --out DIR (one front point) or --front (every point)"),
    (["--front", "--pick", "0"], "give --pick N --out DIR"),
    (["--front", "--out", "x"], "--out goes with --pick"),
    (["--pick", "0"], "--pick 0 needs --out DIR"),
    (["--front", "--tokens", "0"], "distill.tokens must be at least 1"),
    (["--front", "--data", "wikitext2"], "is evaluation data"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message) -> None:
    write_run_spec(str(tmp_path), load_spec({"run_dir": str(tmp_path)}))
    assert main(["recover", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized()


def test_a_run_that_cannot_be_recovered_is_refused_before_ray_starts(tmp_path, capsys) -> None:
    assert main(["recover", str(tmp_path / "nothing"), "--front"]) == 2
    assert "not a prunetune run directory" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    sharded = load_spec({"run_dir": str(tmp_path / "run"), "evaluation": {"mode": "masked"},
                         "resources": {"gpus_per_evaluator": 2, "sharding": "zero3"}})
    write_run_spec(str(tmp_path / "run"), sharded)
    assert main(["recover", str(tmp_path / "run"), "--front"]) == 2
    assert "resources.sharding: zero3: recover --front distils" in capsys.readouterr().err
    write_run_spec(str(tmp_path / "empty"), load_spec({"run_dir": str(tmp_path / "empty")}))
    assert main(["recover", str(tmp_path / "empty"), "--front"]) == 2
    assert "no one-shot result in the log yet" in capsys.readouterr().err
    assert main(["recover", "s3://bucket/run", "--front"]) == 2
    assert "give a local or shared-filesystem run directory" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_the_token_budget_is_counted_in_whole_optimizer_steps() -> None:
    settings = DistillSettings(tokens=1000, seq_len=32, micro_batch=2, accumulation=2)
    assert settings.trained_tokens == 1024 == settings.steps * 4 * 32
