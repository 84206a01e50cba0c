"""Inputs that cannot be used fail before Ray starts: exit code 2, one line naming the
spec field and its value."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants
import ray

from prunetune.evaluators.model import tiny_config
from prunetune.orchestrator import search
from prunetune.orchestrator.cli import main
from prunetune.orchestrator.preflight import check_inputs
from prunetune.orchestrator.spec import default_spec, load_spec

ADAPTERS = "llama, mistral, qwen2"
NOT_FOUND = "give a hub id, a checkpoint directory, a .gguf file or a config.json"


@pytest.fixture(autouse=True)
def no_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every search here must stop before anything starts."""
    def started(*args: object, **kwargs: object) -> None:
        pytest.fail("the search started")

    monkeypatch.setattr(search, "run_search", started)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this test's own."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    """A checkpoint directory whose config.json is a supported architecture."""
    folder = tmp_path / "llama"
    folder.mkdir()
    tiny_config("llama").to_json_file(folder / "config.json")
    return folder


def search_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str) -> str:
    """Run `prunetune search` on a spec; it must fail before Ray with exit code 2.

    Returns its one line of error output, without the `prunetune search: <spec>: ` prefix.
    """
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    assert main(["search", str(path)]) == 2
    assert not ray.is_initialized()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    prefix = f"prunetune search: {path}: "
    assert err.startswith(prefix), err
    return err[len(prefix):].rstrip("\n")


def cache_hub_model(cache: Path, repo_id: str, config: dict[str, object]) -> None:
    """Put a model's config.json into a Hugging Face cache, as a download would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))


def test_a_model_path_that_does_not_exist(tmp_path, capsys) -> None:
    assert search_fails(tmp_path, capsys, "model: /nonexistent/model\n") == (
        f"model: '/nonexistent/model' does not exist: {NOT_FOUND}")


def test_a_gguf_file_that_does_not_exist(tmp_path, capsys) -> None:
    assert search_fails(tmp_path, capsys, "model: missing.gguf\n") == (
        f"model: 'missing.gguf' does not exist: {NOT_FOUND}")


def test_a_hub_id_not_in_the_cache_while_offline(tmp_path, capsys, monkeypatch,
                                                 hub_cache) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert search_fails(tmp_path, capsys, "model: prunetune-tests/absent\n") == (
        f"model: 'prunetune-tests/absent' is not a local path, and this hub id is not in the "
        f"Hugging Face cache ({hub_cache}) while HF_HUB_OFFLINE is set: download it first "
        "(`hf download prunetune-tests/absent`) or unset HF_HUB_OFFLINE")


def test_plan_finds_a_hub_models_config_the_same_way(tmp_path, capsys, monkeypatch,
                                                    hub_cache) -> None:
    """`prunetune plan` reads a hub model's config.json through the same offline-aware lookup."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: prunetune-tests/absent\n")
    assert main(["plan", str(spec)]) == 2
    assert "this hub id is not in the Hugging Face cache" in capsys.readouterr().err
    cache_hub_model(hub_cache, "prunetune-tests/present", tiny_config("llama").to_dict())
    spec.write_text("model: prunetune-tests/present\n")
    assert main(["plan", str(spec)]) == 0
    assert "llama" in capsys.readouterr().out


def test_a_hub_id_not_in_the_cache_without_network(tmp_path, capsys, monkeypatch,
                                                   hub_cache) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert search_fails(tmp_path, capsys, "model: prunetune-tests/absent\n") == (
        f"model: 'prunetune-tests/absent' is not a local path, and this hub id is not in the "
        f"Hugging Face cache ({hub_cache}), and the Hub cannot be reached "
        "(ConnectionError: Name or service not known)")


def test_a_gguf_file_that_is_not_gguf(tmp_path, capsys) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not found</html>")
    assert search_fails(tmp_path, capsys, f"model: {fake}\n") == (
        f"model: '{fake}' is not a GGUF file: it does not start with the bytes 'GGUF'")


@pytest.mark.parametrize("source", ["directory", "config file", "cached hub id"])
def test_an_architecture_without_an_adapter(tmp_path, capsys, monkeypatch, hub_cache,
                                            source) -> None:
    config = {"model_type": "gpt2", "n_layer": 2}
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    cache_hub_model(hub_cache, "prunetune-tests/gpt2", config)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = {"directory": str(folder), "config file": str(folder / "config.json"),
             "cached hub id": "prunetune-tests/gpt2"}[source]
    assert search_fails(tmp_path, capsys, f"model: {model}\n") == (
        f"model: '{model}' is a 'gpt2' model, and prunetune has adapters for {ADAPTERS} only")


def test_a_cached_hub_id_of_a_supported_architecture_passes(monkeypatch, hub_cache) -> None:
    cache_hub_model(hub_cache, "prunetune-tests/llama", tiny_config("llama").to_dict())
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    check_inputs(load_spec({"model": "prunetune-tests/llama"}))


def test_a_checkpoint_directory_without_a_config(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert search_fails(tmp_path, capsys, f"model: {empty}\n") == (
        f"model: no model config at {empty}: expected a config.json file or a model "
        "directory that holds one")


@pytest.mark.parametrize("field, line", [
    ("data", "evaluation: {data: /nowhere/corpus.txt}"),
    ("calibration", "evaluation: {calibration: /nowhere/corpus.txt}"),
])
def test_a_text_file_that_does_not_exist(tmp_path, capsys, llama_dir, field, line) -> None:
    assert search_fails(tmp_path, capsys, f"model: {llama_dir}\n{line}\n") == (
        f"evaluation.{field}: unknown text source '/nowhere/corpus.txt': give a path to a "
        "text file, one of wikitext2, wikitext2:test, wikitext2:valid, wikitext2-raw, "
        "wikitext2-raw:test, wikitext2-raw:valid, or a Hugging Face dataset "
        "'name/config:split' (that needs `pip install datasets`)")


def test_a_task_file_that_does_not_exist(tmp_path, capsys, llama_dir) -> None:
    spec = f"model: {llama_dir}\nevaluation: {{tasks: [piqa, /nowhere/task.jsonl]}}\n"
    assert search_fails(tmp_path, capsys, spec) == (
        "evaluation.tasks[1]: task file not found: /nowhere/task.jsonl")


def test_an_lm_eval_task_needs_lm_eval_installed(tmp_path, capsys, monkeypatch, llama_dir) -> None:
    import importlib.util

    spec = f"model: {llama_dir}\nevaluation: {{tasks: [piqa, lm_eval:arc_easy]}}\n"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert search_fails(tmp_path, capsys, spec) == (
        "evaluation.tasks[1]: 'lm_eval:arc_easy' runs through lm-evaluation-harness, which is "
        'not installed: pip install "prunetune[lm_eval]"')


def test_a_prunetune_data_folder_without_the_data(tmp_path, capsys, monkeypatch,
                                                  llama_dir) -> None:
    monkeypatch.setenv("PRUNETUNE_DATA", str(tmp_path))
    spec = f"model: {llama_dir}\nevaluation: {{importance: none}}\n"
    assert search_fails(tmp_path, capsys, spec) == (
        f"evaluation.data: 'wikitext2' reads wikitext-2/test.txt, and PRUNETUNE_DATA="
        f"{str(tmp_path)!r} has no such file (nor wikitext-2/test.txt.gz)")


def test_data_a_model_with_random_weights_never_reads_is_not_checked(tmp_path) -> None:
    config = tmp_path / "config.json"
    tiny_config("llama").to_json_file(config)
    check_inputs(load_spec({"model": str(config), "evaluation": {"data": "/nowhere.txt"}}))


def test_the_default_spec_passes_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PRUNETUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    check_inputs(default_spec())
