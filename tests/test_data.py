"""rankopt.tasks.data: where a task's label names come from."""

from __future__ import annotations

import datasets
import pytest

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


# bad data (issue 25): one line naming the file, the row and the fix, whatever the file holds

GOOD_TRAIN = b'{"text": "w1 good", "label": 1}\n{"text": "w2 bad", "label": 0}\n'
GOOD_CSV = b"text,label\nw1 good,1\nw2 bad,0\n"
BAD_DATA = {  # case -> (file name, bytes, task type, what the message must say)
    "empty jsonl": ("train.jsonl", b"", "classification", "train.jsonl is empty"),
    "blank lines only": ("train.jsonl", b"\n\n  \n", "classification", "train.jsonl is empty"),
    "csv header only": ("train.csv", b"text,label\n", "classification", "train.csv has a header but no rows"),
    "not utf-8 jsonl": ("train.jsonl", b'{"text": "a", "label": 1}\n{"text": "b\xff", "label": 0}\n',
                        "classification", "train.jsonl line 2 is not UTF-8"),
    "not utf-8 csv": ("train.csv", b"text,label\na,1\nb\xfe,0\n", "classification", "train.csv line 3 is not UTF-8"),
    "broken json line": ("train.jsonl", b'{"text": "a", "label": 1}\n{"text": "b",\n', "classification",
                         "train.jsonl line 2 is not valid JSON"),
    "json list line": ("train.jsonl", b'{"text": "a", "label": 1}\n[1, 2]\n', "classification",
                       "train.jsonl line 2 is a JSON list"),
    "csv extra field": ("train.csv", b"text,label\na,1\nb,0,9\n", "classification",
                        "train.csv line 3 has 3 field(s), the header 2"),
    "csv quote never closed": ("train.csv", b'text,label\na,1\n"b,0\nc,1\n', "classification",
                               "train.csv line 3 has 1 field(s), the header 2"),
    "empty json list": ("train.json", b"[]", "classification", "train.json is an empty list"),
    "json list of numbers": ("train.json", b'[{"text": "a", "label": 1}, 2]', "classification",
                             "train.json item 2 is a JSON int, not an object"),
    "empty csv label": ("train.csv", b"text,label\na,1\nb,\n", "classification",
                        "train.csv row 2 (line 3) has no label"),
    "nan csv label": ("train.csv", b"text,label\na,1\nb,nan\n", "classification",
                      "train.csv row 2 (line 3) has no label"),
    "negative class id": ("train.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": -1}\n', "classification",
                          "train.jsonl row 2 has label -1; a classification label is a class id"),
    "nan json label": ("train.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n', "classification",
                       "train.jsonl row 2 has label nan; a classification label is a class id"),
    "null label": ("train.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', "classification",
                   "train.jsonl row 2 has no label"),
    "missing text": ("train.jsonl", b'{"text": "a", "label": 1}\n{"label": 0}\n', "classification",
                     "train.jsonl row 2 has no 'text'"),
    "nan regression label": ("train.jsonl", b'{"text": "a", "label": 1.5}\n{"text": "b", "label": NaN}\n',
                             "regression", "train.jsonl row 2 has label nan, not a finite number"),
    "word regression label": ("train.csv", b"text,label\na,1.5\nb,high\n", "regression",
                              "train.csv row 2 (line 3) has label 'high', not a finite number"),
    "numbers and words": ("train.csv", b"text,label\na,1\nb,pos\nc,0\n", "classification",
                          "train.csv mixes numbers and words in label column 'label' (row 1: '1', row 2: 'pos')"),
    "class only in validation": ("validation.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n',
                                 "classification", "validation.jsonl row 2 has label 2, which no row of"),
}


def test_odd_but_valid_files_are_read(tmp_path, tokenizer):
    """A UTF-8 byte order mark, CRLF line ends, quoted commas and a .json list are data, not errors."""
    from rankopt.tasks.data import prepare

    (tmp_path / "train.csv").write_bytes(b'\xef\xbb\xbftext,label\r\n"w1, good",1\r\nw2 bad,0\r\n')
    (tmp_path / "validation.json").write_bytes(b'\xef\xbb\xbf[{"text": "w1 good", "label": 1}, {"text": "w2", "label": 0}]')
    data = prepare(TaskConfig(name="t", data_dir=str(tmp_path), text_columns=["text"]), tokenizer)
    assert len(data.train) == 2 and len(data.eval) == 2


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_named_by_file_and_row(case, tmp_path, tokenizer):
    from rankopt.errors import RankoptError
    from rankopt.tasks.data import prepare

    name, content, task_type, message = BAD_DATA[case]
    if not name.endswith(".json"):
        (tmp_path / ("train.csv" if name.endswith(".csv") else "train.jsonl")).write_bytes(
            GOOD_CSV if name.endswith(".csv") else GOOD_TRAIN)
    (tmp_path / "validation.jsonl").write_bytes(GOOD_TRAIN)
    (tmp_path / name).write_bytes(content)
    task = TaskConfig(name="t", data_dir=str(tmp_path), text_columns=["text"], type=task_type,
                      metric="pearson" if task_type == "regression" else "accuracy")
    with pytest.raises(RankoptError) as caught:
        prepare(task, tokenizer)
    text = str(caught.value)
    assert message in text and str(tmp_path) in text and "\n" not in text, text


def test_cli_reports_bad_data_in_one_line_and_writes_nothing(tmp_path, tiny_preset):
    """Exit 2, one line, and no --out folder: no MLflow store, no run."""
    import yaml
    from typer.testing import CliRunner

    from rankopt.cli import app

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_bytes(b"text,label\nw1 good,1\nw2 bad,\n")
    (data / "validation.jsonl").write_bytes(GOOD_TRAIN)
    preset = tmp_path / "p.yml"
    space = {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    preset.write_text(yaml.safe_dump({**tiny_preset, "task": {**tiny_preset["task"], "data_dir": str(data)},
                                      "search": {"space": space}}))
    for command in (["train", str(preset)], ["tune", str(preset), "--trials", "1"]):
        result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [f"error: {data / 'train.csv'} row 2 (line 3) has no label in "
                                                      "column 'label'; fill it in or drop the row"]
        assert not (tmp_path / "out").exists()
