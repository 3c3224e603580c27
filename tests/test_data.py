"""rankopt.tasks.data: where a task's label names come from."""

from __future__ import annotations

import datasets

from rankopt.config import TaskConfig
from rankopt.tasks.data import _label_space


def _task() -> TaskConfig:
    return TaskConfig(name="t", data_dir=".", text_columns=["text"])


def test_label_names_come_from_string_labels_in_sorted_order():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["sports", "ai"]}),
                                "eval": datasets.Dataset.from_dict({"text": ["c"], "label": ["ai"]})})
    assert _label_space(_task(), raw) == (2, ["ai", "sports"], {"ai": 0, "sports": 1})


def test_label_names_come_from_a_hub_class_label_feature():
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    split = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features)
    raw = datasets.DatasetDict({"train": split, "eval": split})
    assert _label_space(_task(), raw) == (2, ["negative", "positive"], None)
    plain = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": [1]}),
                                  "eval": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})})
    assert _label_space(_task(), plain) == (2, None, None)  # bare ids: no names to invent
