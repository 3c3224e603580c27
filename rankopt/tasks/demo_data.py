"""Offline demo data from English chatterbot-corpus conversations (installed by a dependency).

Two tasks: utterance -> its conversation topic (classification), and utterance -> the reply
that follows it in the conversation (instruction data for causal-LM fine-tuning).

Real human-written text that a dependency (``chatterbot-corpus``) installs, so the demo
needs no network. Every distinct utterance of a topic's conversations is one example;
topics with too few distinct utterances are left out and large ones are capped, so the
classes stay roughly balanced. The split is a fixed function of the text (a hash), so it
never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import yaml

TOPICS = ("ai", "coding", "conversations", "emotion", "literature", "psychology", "science", "sports", "trivia")
PER_TOPIC = 100
EVAL_SHARE = 0.2


def _conversations(topic: str) -> list[list[str]]:
    path = resources.files("chatterbot_corpus") / "data" / "english" / f"{topic}.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [[" ".join(line.split()) for line in conversation if isinstance(line, str) and line.strip()]
            for conversation in doc.get("conversations", [])]


def _utterances(topic: str) -> list[str]:
    seen = dict.fromkeys(line for conversation in _conversations(topic) for line in conversation)
    return sorted(seen, key=_digest)[:PER_TOPIC]


def _is_eval(text: str) -> bool:
    return int(_digest("split:" + text)[:8], 16) / 0xFFFFFFFF < EVAL_SHARE


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chatterbot_splits() -> dict[str, dict[str, list]]:
    """``{'train': {'text': [...], 'label': [...]}, 'validation': {...}}``; labels are topic names."""
    splits = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []}}
    for topic in TOPICS:
        for text in _utterances(topic):
            split = "validation" if _is_eval(text) else "train"
            splits[split]["text"].append(text)
            splits[split]["label"].append(topic)
    return splits


def chatterbot_dialog_splits() -> dict[str, dict[str, list]]:
    """``{'train': {'prompt': [...], 'response': [...]}, 'validation': {...}}``: each line and its reply.

    A prompt with several replies keeps the first; the split follows the prompt, so no prompt
    is in both splits.
    """
    pairs: dict[str, str] = {}
    for topic in TOPICS:
        for conversation in _conversations(topic):
            for prompt, response in zip(conversation, conversation[1:]):
                pairs.setdefault(prompt, response)
    splits = {"train": {"prompt": [], "response": []}, "validation": {"prompt": [], "response": []}}
    for prompt in sorted(pairs, key=_digest):
        split = splits["validation" if _is_eval(prompt) else "train"]
        split["prompt"].append(prompt)
        split["response"].append(pairs[prompt])
    return splits
