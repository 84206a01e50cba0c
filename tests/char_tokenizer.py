"""A tokenizer whose token counts are known in advance, for tests with tiny models."""

from __future__ import annotations


class CharTokenizer:
    """One token per printable ASCII character (96 ids, the tiny models' vocabulary)."""

    bos_token_id = 0
    eos_token_id = 95

    def __call__(self, text: str, add_special_tokens: bool = True, **_: object) -> dict:
        ids = [ord(c) - 32 if 32 <= ord(c) < 127 else 95 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}
