"""Chat data: conversations rendered with the tokenizer's chat template, loss on assistant turns only.

The template is rendered once for the whole conversation and once per assistant turn for its
prefix (``add_generation_prompt=True``) and for the conversation up to the end of that turn; the
characters in between are the turn's reply and its end-of-turn marker. Tokens whose offsets lie
inside such a span carry labels, every other token (system, user, the template's headers) is -100.
This needs no ``{% generation %}`` markers in the template, only that rendering is incremental
(the conversation up to turn i is a prefix of the whole), true of the usual templates.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from rankopt.errors import RankoptError


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, column: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise RankoptError(f"task.messages_column={column!r} needs a tokenizer with a chat template, and this "
                           "model's has none; use a chat/instruct model's tokenizer or prompt_column/response_column")
    if not getattr(tokenizer, "is_fast", False):
        raise RankoptError("task.messages_column needs a fast tokenizer (offsets); this model has only a slow one")


def _messages(value: Any) -> list[dict[str, str]]:
    messages = json.loads(value) if isinstance(value, str) else value
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise RankoptError("a messages row is not a list of {role, content}; fix the data's messages column")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies."""
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[:i + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise RankoptError("this tokenizer's chat template does not render conversations incrementally, so "
                               "assistant turns cannot be located; use prompt_column/response_column instead")
        spans.append((len(start), len(end)))
    return full, spans


def chat_ids(tokenizer: PreTrainedTokenizerBase, value: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids of one conversation, labels on the assistant replies only (truncated at the end)."""
    text, spans = assistant_spans(tokenizer, _messages(value))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    ids = enc["input_ids"]
    labels = [tok if b > a and any(s <= a and b <= e for s, e in spans) else -100
              for tok, (a, b) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
