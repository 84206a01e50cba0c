"""Zero-shot tasks through lm-evaluation-harness, on the model the evaluator already holds.

Papers report zero-shot accuracy through lm-evaluation-harness, so its task definitions,
prompts and metrics are the reference. `ResidentLM` is an lm-eval model over a model and
tokenizer that are already loaded (the evaluator's model, dense, masked or extracted):
lm-eval builds the requests and splits them into tokens (`TemplateLM`, as its `hf` model
does), and prunetune's batched scorer (`zeroshot.token_loglikelihoods`) runs them, so
nothing is reloaded per evaluation. Tasks are loaded once (`load_harness_tasks`) and scored
per sub-network (`harness_scores`).

lm-eval is an optional extra (`pip install "prunetune[lm_eval]"`): import this module only
where lm-eval tasks are asked for. The tasks in `harness_tasks/` (PIQA) read prunetune's
data folder and run offline; any other task reads lm-eval's dataset (the Hugging Face hub,
or its local cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

try:
    import datasets
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.manager import TaskDict
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        f"lm-eval tasks need lm-evaluation-harness, and {err.name} is not installed: "
        'pip install "prunetune[lm_eval]"'
    ) from err

from prunetune.evaluators.zeroshot import piqa_documents, token_loglikelihoods

LOCAL_TASKS_DIR = Path(__file__).parent / "harness_tasks"
"""lm-eval task configs that read prunetune's data folder; each file is named for its task."""

HARNESS_METRICS = ("acc", "acc_norm")
"""lm-eval metrics reported, as `<metric>_<task>`: the names the search's objectives use."""


class ResidentLM(TemplateLM):
    """An lm-eval model over a causal LM and tokenizer already in memory.

    It answers log-likelihood requests (multiple-choice and perplexity tasks), tokenized as
    lm-eval's `hf` model tokenizes them. Generation (`generate_until`) is not supported.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, or EOS where there is none (as `hf` does)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        """The context window, the length `token_loglikelihoods` truncates to."""
        return self.model.config.max_position_embeddings

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of `string`, with the tokenizer's own special tokens unless
        `add_special_tokens` says otherwise, as `hf` encodes."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, return_attention_mask=False, **options)["input_ids"]

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) per request; no progress bar by
        default, since a search scores thousands of sub-networks."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return token_loglikelihoods(self.model, pairs, self.batch_size, greedy=True)

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = True
    ) -> list[float]:
        """log P(text) of each whole text, every token scored once, in lm-eval's rolling
        windows of the context length."""
        windows = [self._rolling_windows(text) for (text,) in (r.args for r in requests)]
        flat = [window for text_windows in windows for window in text_windows]
        scores = iter(token_loglikelihoods(self.model, flat, self.batch_size))
        return [sum(next(scores)[0] for _ in text_windows) for text_windows in windows]

    def _rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        return [
            make_disjoint_window(window)
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
        ]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "prunetune scores lm-eval tasks by log-likelihood only (multiple-choice and "
            "perplexity tasks such as piqa, arc_easy, hellaswag, wikitext); generation tasks "
            "(output_type generate_until, such as gsm8k) are not supported"
        )


def piqa_dataset(**_: Any) -> datasets.DatasetDict:
    """The local PIQA task's documents (`custom_dataset` of `harness_tasks/piqa.yaml`;
    lm-eval passes the task's metadata, which it does not need)."""
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(piqa_documents())})


def harness_task_manager(names: Sequence[str]) -> TaskManager:
    """lm-eval's task index, with the local tasks of `LOCAL_TASKS_DIR` over lm-eval's own.

    lm-eval's thousands of task configs take seconds to index, so they are indexed only
    when `names` asks for a task that is not local.
    """
    local = {path.stem for path in LOCAL_TASKS_DIR.glob("*.yaml")}
    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=not set(names) <= local)


def load_harness_tasks(names: Sequence[str], task_manager: TaskManager | None = None) -> TaskDict:
    """The lm-eval tasks (or groups) `names`, with their documents, loaded once for every
    evaluation; `task_manager` defaults to `harness_task_manager(names)`."""
    if not names:
        raise ValueError("no lm-eval tasks to load")
    return (task_manager or harness_task_manager(names)).load(list(names))


def harness_scores(
    model: nn.Module, tokenizer: Any, tasks: TaskDict, limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """`acc_<task>` and `acc_norm_<task>` of `model` on lm-eval `tasks`, zero-shot, on the
    first `limit` documents of each (lm-eval's `--limit`), for every task and group that
    lm-eval reports these metrics for."""
    results = evaluate(lm=ResidentLM(model, tokenizer, batch_size), task_dict=tasks,
                       limit=limit, bootstrap_iters=0, log_samples=False)
    return {
        f"{metric}_{name}": float(values[f"{metric},none"])
        for name, values in results["results"].items()
        for metric in HARNESS_METRICS
        if f"{metric},none" in values
    }
