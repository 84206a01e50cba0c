"""Checks of a spec's inputs before Ray starts: the model and the data can be used.

`spec.py` checks a spec's shape; these checks look at the file system and the Hugging
Face cache, on the driver, once, before the search starts. A model path that does not
exist, a hub id that cannot be had, a `.gguf` file that is not one, an architecture
without an adapter, or a data file that is not there then fails in a second with one
line naming the spec field and its value, instead of minutes later inside a Ray worker
with a long traceback. Nothing here loads weights or reads more than a config file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from prunetune.cluster.plan import load_config_file
from prunetune.evaluators.data import text_file
from prunetune.evaluators.model import hub_config_file, is_config_file, resolve_source
from prunetune.evaluators.settings import HARNESS_PREFIX
from prunetune.evaluators.zeroshot import task_files
from prunetune.orchestrator.spec import Spec, SpecError
from prunetune.search_spaces.dims import SUPPORTED_MODEL_TYPES

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""


def check_inputs(spec: Spec, source: str = "<spec>") -> None:
    """Raise SpecError, one line per problem (`<source>: <field>: <value and reason>`),
    when the spec's model or evaluation data cannot be used; `source` names the spec."""
    problems = [*model_problems(spec.model), *data_problems(spec)]
    if problems:
        raise SpecError(source, problems)


def model_problems(model: str) -> list[tuple[str, str]]:
    """Why the spec's `model` cannot be loaded, as (field, reason) pairs: none when it can."""
    try:
        model_type = _model_type(model)
    except (FileNotFoundError, ValueError) as err:
        return [("model", str(err))]
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        return [("model", f"{model!r} is a {model_type!r} model, and prunetune has adapters "
                          f"for {', '.join(SUPPORTED_MODEL_TYPES)} only")]
    return []


def data_problems(spec: Spec) -> list[tuple[str, str]]:
    """Why the evaluation data the spec names cannot be read, as (field, reason) pairs.

    Only what the evaluators will read is checked: a model with random weights (a
    `config.json`) scores random tokens, and calibration text is read only for
    activation importance.
    """
    evaluation = spec.evaluation
    checks: list[tuple[str, Callable[[str], object], str]] = []
    if not is_config_file(spec.model):
        checks.append(("evaluation.data", text_file, evaluation.data))
        if evaluation.importance == "activation":
            checks.append(("evaluation.calibration", text_file, evaluation.calibration))
    checks += [(f"evaluation.tasks[{i}]", _task_check(task), task)
               for i, task in enumerate(evaluation.tasks)]
    return [(field, reason) for field, find, value in checks
            if (reason := _problem(find, value)) is not None]


def _task_check(task: str) -> Callable[[str], object]:
    """How a task is found: a built-in task's files, or lm-eval installed for `lm_eval:`."""
    return _harness_installed if task.startswith(HARNESS_PREFIX) else task_files


def _harness_installed(task: str) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"{task!r} runs through lm-evaluation-harness, which is not "
                         'installed: pip install "prunetune[lm_eval]"')


def _problem(find: Callable[[str], object], value: str) -> str | None:
    """The one-line reason `find(value)` fails, or None when it finds the files."""
    try:
        find(value)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def _model_type(model: str) -> str | None:
    """The `model_type` of a model source, read without loading weights; None for a GGUF
    file, whose architecture transformers reads as it loads it. Raises FileNotFoundError
    or ValueError, naming the model, when the source cannot be used."""
    try:
        path = Path(resolve_source(model)).expanduser()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{model!r}: {err}") from None
    if path.suffix == ".gguf" and path.is_file():
        _check_gguf(model, path)
        return None
    if path.exists():
        return load_config_file(path).get("model_type")
    if not _is_repo_id(model) or path.suffix in (".gguf", ".json"):
        raise FileNotFoundError(f"{model!r} does not exist: give a hub id, a checkpoint "
                                "directory, a .gguf file or a config.json")
    return load_config_file(hub_config_file(model)).get("model_type")


def _check_gguf(model: str, path: Path) -> None:
    with path.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(f"{model!r} is not a GGUF file: it does not start with the "
                             f"bytes {GGUF_MAGIC.decode()!r}")


def _is_repo_id(model: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True
