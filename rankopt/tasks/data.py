"""Task data: load from the hub, a local folder or the demo corpus; check columns; tokenize once.

Everything a user can get wrong (missing files, missing columns, unreachable hub, a bad row:
:mod:`rankopt.tasks.data_checks`) becomes a :class:`RankoptError` before any training or logging starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from rankopt.config import TaskConfig
from rankopt.errors import RankoptError
from rankopt.tasks.data_checks import check_file, check_rows

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Tokenized train and evaluation sets, ready for a DataLoader (``num_labels`` is 0 for causal LM).

    ``test`` is the held-out split (tokenized like ``eval``) or None, ``test_note`` says which split
    it is or why there is none. The trainer never reads it: only the selected trials are scored on it.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int
    label_names: list[str] | None
    collator: DataCollatorWithPadding | DataCollatorForSeq2Seq
    train_collator: object | None = None  # when training rows differ from evaluation rows (packing)

    @property
    def training_collator(self):
        return self.train_collator or self.collator
    test: datasets.Dataset | None = None
    test_note: str = "no test split"
    label_mean: float | None = None  # regression: where the head's output starts (see training.setup)


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in FILE_TYPES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _local_files(task: TaskConfig) -> dict[str, Path]:
    """Role (train, eval, test) -> the file in ``task.data_dir`` that holds it."""
    folder = Path(task.data_dir)
    if not folder.is_dir():
        raise RankoptError(f"task.data_dir '{folder}' is not a folder; point --data at a folder of train/validation files")
    files = {}
    for role, split in (("train", task.train_split), ("eval", task.eval_split)):
        path = _split_file(folder, split)
        if path is None and role == "eval" and split == "validation":
            path = _split_file(folder, "test")
        if path is None:
            raise RankoptError(f"no '{split}' file (.jsonl/.json/.csv/.parquet) in {folder}; add one or set "
                               f"task.{'train' if role == 'train' else 'eval'}_split")
        files[role] = path
    if task.test_split:
        test = _split_file(folder, task.test_split)
        if test is not None and test != files["eval"]:
            files["test"] = test
        elif test is None and task.test_split != "test":
            raise RankoptError(f"no '{task.test_split}' file (.jsonl/.json/.csv/.parquet) in {folder}; add one or "
                               "set task.test_split (null for none)")
    return files


def _load_local(task: TaskConfig) -> datasets.DatasetDict:
    out = {}
    for role, path in _local_files(task).items():
        check_file(path)  # empty, not UTF-8, a broken JSON line: named by line before datasets parses it
        try:
            out[role] = datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train")
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            cause = exc.__cause__ or exc  # datasets wraps the parser's message, which names the line
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise RankoptError(f"cannot read {path}: {reason}; check the file format") from None
    return datasets.DatasetDict(out)


def data_sources(task: TaskConfig) -> dict[str, str]:
    """Role -> where its rows come from, as error messages name it (a file path, a hub split)."""
    roles = {"train": task.train_split, "eval": task.eval_split, "test": task.test_split}
    if task.builtin:
        return {role: f"the built-in {task.builtin} data ({role})" for role in roles}
    if task.data_dir:
        return {role: str(path) for role, path in _local_files(task).items()}
    name = f"{task.dataset}/{task.subset}" if task.subset else task.dataset
    return {role: f"split '{split}' of dataset '{name}'" for role, split in roles.items()}


def _load_hub(task: TaskConfig) -> datasets.DatasetDict:
    name = f"{task.dataset}/{task.subset}" if task.subset else task.dataset
    try:
        loaded = datasets.load_dataset(task.dataset, task.subset)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing config: all the user's to fix
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RankoptError(f"cannot load dataset '{name}' from the hub ({reason}); "
                           "pass --data DIR with local train/validation files") from None
    missing = [s for s in (task.train_split, task.eval_split) if s not in loaded]
    if missing:
        raise RankoptError(f"dataset '{name}' has no split {missing[0]!r} (it has {sorted(loaded)}); "
                           "set task.train_split / task.eval_split")
    out = {"train": loaded[task.train_split], "eval": loaded[task.eval_split]}
    if task.test_split in loaded and task.test_split != task.eval_split:
        out["test"] = loaded[task.test_split]
    elif task.test_split and task.test_split != "test" and task.test_split not in loaded:
        raise RankoptError(f"dataset '{name}' has no split {task.test_split!r} (it has {sorted(loaded)}); "
                           "set task.test_split (null for none)")
    return datasets.DatasetDict(out)


def _load_builtin(task: TaskConfig) -> datasets.DatasetDict:
    from rankopt.tasks import demo_data

    splits = {"chatterbot_dialogs": demo_data.chatterbot_dialog_splits,
              "chatterbot_chats": demo_data.chatterbot_chat_splits}.get(task.builtin, demo_data.chatterbot_splits)()
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(splits["train"]),
                                 "eval": datasets.Dataset.from_dict(splits["validation"])})


def load_raw(task: TaskConfig) -> datasets.DatasetDict:
    """Untokenized ``train`` and ``eval`` splits with the task's columns checked."""
    if task.builtin:
        raw = _load_builtin(task)
    elif task.data_dir:
        raw = _load_local(task)
    else:
        raw = _load_hub(task)
    for role, split in raw.items():
        if role == "test":
            continue  # a test split without labels is no test split (see _labelled_test), not an error
        missing = [c for c in task.columns() if c not in split.column_names]
        if missing:
            keys = "task.prompt_column / task.response_column" if task.type == "causal_lm" else \
                "task.text_columns / task.label_column"
            source = data_sources(task).get(role, f"{role} data")
            raise RankoptError(f"{source} has no column {missing[0]!r} (columns: {', '.join(split.column_names)}); "
                               f"set {keys} to match")
    return raw


def _subsample(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def _missing_label(value, task_type: str) -> bool:
    """GLUE's hub test splits hold -1 where the label is secret; files may leave it empty."""
    if value is None or value == "":
        return True
    return task_type != "causal_lm" and not isinstance(value, str) and value == -1


def _labelled_test(task: TaskConfig, test: datasets.Dataset | None) -> tuple[datasets.Dataset | None, str]:
    """The raw test split if it can score a model, and a note saying which split it is or why there is none."""
    if not task.test_split:
        return None, "no test split (task.test_split is null)"
    if test is None:
        if task.data_dir and task.eval_split == "validation" and task.test_split == "test" and \
                _split_file(Path(task.data_dir), "validation") is None and _split_file(Path(task.data_dir), "test"):
            return None, "no test split (the test file serves as validation: there is no validation file)"
        return None, f"no test split (the data has no '{task.test_split}' split)"
    label = task.response_column if task.type == "causal_lm" else task.label_column
    missing = [c for c in task.columns() if c not in test.column_names]
    if missing and missing != [label]:
        raise RankoptError(f"test data has no column {missing[0]!r} (columns: {', '.join(test.column_names)}); "
                           "set task.test_split=null or fix the file")
    if missing or all(_missing_label(v, task.type) for v in test[label]):
        return None, f"no test split ('{task.test_split}' has no labels)"
    if any(_missing_label(v, task.type) for v in test[label]):
        raise RankoptError(f"some rows of the '{task.test_split}' split have no label; drop them, or set "
                           "task.test_split=null")
    return test, f"split '{task.test_split}'"


def _label_space(task: TaskConfig, raw: datasets.DatasetDict) -> tuple[int, list[str] | None, dict | None]:
    """Number of labels, their names, and a name -> id map when labels are strings."""
    if task.type == "regression":
        return 1, None, None
    values = set(raw["train"][task.label_column]) | set(raw["eval"][task.label_column])
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
        return task.num_labels or len(names), names, {n: i for i, n in enumerate(names)}
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise RankoptError(f"labels in column '{task.label_column}' must be class ids 0..K-1 or names "
                           "for a classification task; set task.type=regression for scores")
    num = max(values) + 1
    if task.num_labels and task.num_labels < num:
        raise RankoptError(f"task.num_labels={task.num_labels} but labels go up to {num - 1}; raise task.num_labels")
    feature = raw["train"].features.get(task.label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None  # a hub dataset's names
    if names is not None and len(names) != (task.num_labels or num):
        names = None
    return task.num_labels or num, names, None


def prompt_response_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                        max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response (+ EOS), labels -100 on the prompt so only the response is learned.

    Too long: the prompt loses its start, the response keeps at least half of ``max_length``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[:max(max_length // 2, max_length - len(prompt_ids))]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    ids = [*prompt_ids, *response_ids]
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [-100] * len(prompt_ids) + list(response_ids)}


def _prepare_causal_lm(task: TaskConfig, raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    from rankopt.tasks.chat import chat_ids, check_chat_tokenizer

    if task.messages_column:
        check_chat_tokenizer(tokenizer, task.messages_column)

    def encode(row: dict) -> dict:
        if task.messages_column:
            return chat_ids(tokenizer, row[task.messages_column], task.max_length)
        return prompt_response_ids(tokenizer, str(row[task.prompt_column]), str(row[task.response_column]),
                                   task.max_length)

    tokenized = {role: split.map(encode, remove_columns=split.column_names) for role, split in raw.items()}
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    train, train_collator = tokenized["train"], collator
    if task.packing:  # training rows only: evaluation stays one example per row
        from rankopt.tasks.packing import PackedCollator, pack

        train = pack(train, task.max_length)
        train_collator = PackedCollator(tokenizer.pad_token_id or 0)
    return TaskData(train=train, eval=tokenized["eval"], num_labels=0, label_names=None,
                    collator=collator, train_collator=train_collator,
                    test=tokenized.get("test"))


def prepare(task: TaskConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> TaskData:
    """Load, check, subsample and tokenize the task's data (once; reuse the result across trials)."""
    raw = load_raw(task)
    check_rows(task, raw, data_sources(task))  # the first bad row, named, before anything trains
    test, test_note = _labelled_test(task, raw.get("test"))
    raw = datasets.DatasetDict({
        "train": _subsample(raw["train"], task.max_train_samples, seed),
        "eval": _subsample(raw["eval"], task.max_eval_samples, seed),
    })
    if test is not None:
        raw["test"] = _subsample(test, task.max_test_samples, seed)
    if task.type == "causal_lm":
        data = _prepare_causal_lm(task, raw, tokenizer)
        data.test_note = test_note
        return data
    num_labels, names, to_id = _label_space(task, raw)
    cols = task.text_columns
    if test is not None and task.type == "classification":
        known = set(to_id) if to_id is not None else set(range(num_labels))
        unseen = sorted(set(raw["test"][task.label_column]) - known, key=str)
        if unseen:
            raise RankoptError(f"the '{task.test_split}' split has label {unseen[0]!r}, which train and validation "
                               "never show; fix the data or set task.test_split=null")

    def encode(batch: dict) -> dict:
        texts = [[str(t) for t in batch[c]] for c in cols]
        enc = tokenizer(*texts, truncation=True, max_length=task.max_length)
        labels = batch[task.label_column]
        if to_id is not None:
            labels = [to_id[v] for v in labels]
        elif task.type == "regression":
            labels = [float(v) for v in labels]
        enc["labels"] = labels
        return enc

    tokenized = {
        role: split.map(encode, batched=True, remove_columns=split.column_names) for role, split in raw.items()
    }
    scores = tokenized["train"]["labels"] if task.type == "regression" else None
    return TaskData(train=tokenized["train"], eval=tokenized["eval"], num_labels=num_labels,
                    label_names=names, collator=DataCollatorWithPadding(tokenizer), test=tokenized.get("test"),
                    test_note=test_note, label_mean=sum(scores) / len(scores) if scores else None)

