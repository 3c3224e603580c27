"""Offline demo data from English chatterbot-corpus conversations (installed by a dependency).

Three tasks: utterance -> its conversation topic (classification), utterance -> the reply
that follows it in the conversation (instruction data for causal-LM fine-tuning), and whole
conversations as chats (user and assistant turns alternating, for chat-template fine-tuning).

Real human-written text that a dependency (``chatterbot-corpus``) installs, so the demo
needs no network. Every distinct utterance of a topic's conversations is one example;
topics with too few distinct utterances are left out and large ones are capped, so the
classes stay roughly balanced. The split is a fixed function of the text (a hash), so it
never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
import json
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


CHAT_TOPICS = ("ai", "botprofile", "computers", "conversations", "emotion", "food", "gossip", "greetings",
               "health", "history", "humor", "literature", "money", "movies", "politics", "psychology",
               "science", "sports", "tech_support", "trivia")
CHATS_PER_TOPIC = 60  # tech_support alone has 1 050 conversations: capped, no topic dominates
MAX_TURNS = 8  # messages per chat (user + assistant); longer conversations are cut into several chats
SYSTEM_SHARE = 0.5  # chats that open with a system prompt (the others get the template's default, if any)


def _chats(topic: str) -> list[list[dict[str, str]]]:
    """A topic's conversations as chats: lines alternate user / assistant, each chat ends on an assistant turn."""
    chats = []
    for conversation in _conversations(topic):
        for start in range(0, len(conversation), MAX_TURNS):
            lines = conversation[start:start + MAX_TURNS]
            lines = lines[:len(lines) - len(lines) % 2]  # a last user line has no reply to learn
            if not lines:
                continue
            chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": line} for i, line in enumerate(lines)]
            if int(_digest("system:" + lines[0] + lines[1])[:8], 16) / 0xFFFFFFFF < SYSTEM_SHARE:
                chat.insert(0, {"role": "system", "content": f"You are a friendly chatbot. Topic: {topic}."})
            chats.append(chat)
    unique = {json.dumps(chat): chat for chat in chats}
    return [unique[key] for key in sorted(unique, key=_digest)[:CHATS_PER_TOPIC]]


def chatterbot_chat_splits() -> dict[str, dict[str, list]]:
    """``{'train': {'messages': [...]}, 'validation': {...}}``: chats as lists of ``{role, content}``.

    The split follows the chat's first user line, so no opening question is in both splits (the
    corpus answers some questions several ways, as separate conversations).
    """
    splits: dict[str, dict[str, list]] = {"train": {"messages": []}, "validation": {"messages": []}}
    for topic in CHAT_TOPICS:
        for chat in _chats(topic):
            first = next(m["content"] for m in chat if m["role"] == "user")
            splits["validation" if _is_eval(first) else "train"]["messages"].append(chat)
    return splits
