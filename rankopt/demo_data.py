"""The offline demo task: English chatterbot-corpus utterances -> their conversation topic.

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


def _utterances(topic: str) -> list[str]:
    path = resources.files("chatterbot_corpus") / "data" / "english" / f"{topic}.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    seen: dict[str, None] = {}
    for conversation in doc.get("conversations", []):
        for line in conversation:
            if isinstance(line, str) and line.strip():
                seen.setdefault(" ".join(line.split()), None)
    return sorted(seen, key=_digest)[:PER_TOPIC]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chatterbot_splits() -> dict[str, dict[str, list]]:
    """``{'train': {'text': [...], 'label': [...]}, 'validation': {...}}``; labels are topic names."""
    splits = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []}}
    for topic in TOPICS:
        for text in _utterances(topic):
            bucket = int(_digest("split:" + text)[:8], 16) / 0xFFFFFFFF
            split = "validation" if bucket < EVAL_SHARE else "train"
            splits[split]["text"].append(text)
            splits[split]["label"].append(topic)
    return splits
