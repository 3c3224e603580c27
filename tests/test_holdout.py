"""The honest final score: which split is the test split, and the selected trial scored on it once, after the study.

The study is the tiny 3-trial project of tiny_project_support (random BERT, sentiment jsonl with a test
file); the data rules are checked on the real GLUE files in ../shared/data/glue.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from rankopt.config import TaskConfig
from rankopt.errors import RankoptError
from rankopt.search import holdout
from rankopt.tasks.data import _labelled_test, load_raw

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def _glue_task(name: str, **extra) -> TaskConfig:
    if not (GLUE / name).is_dir():
        pytest.skip(f"GLUE data not found at {GLUE / name}")
    return TaskConfig(name=name, data_dir=str(GLUE / name), text_columns=["sentence1", "sentence2"], **extra)


def test_a_labelled_test_file_is_the_test_split():
    task = _glue_task("rte")
    test, note = _labelled_test(task, load_raw(task).get("test"))
    assert len(test) == 1384 and note == "split 'test'"


def test_a_test_file_that_serves_as_validation_is_not_a_test_split():
    task = _glue_task("mrpc")  # train + test only: the test file is the validation split
    raw = load_raw(task)
    assert "test" not in raw and len(raw["eval"]) == 1725
    assert _labelled_test(task, raw.get("test")) == (None, "no test split (the test file serves as validation: "
                                                           "there is no validation file)")


def test_hub_style_test_labels_of_minus_one_mean_no_test_split(tmp_path):
    for split, label in (("train", 1), ("validation", 0), ("test", -1)):  # GLUE on the hub hides test labels as -1
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": label}) + "\n"
                                                         for i in range(4)))
    task = TaskConfig(name="t", data_dir=str(tmp_path), text_columns=["text"])
    assert _labelled_test(task, load_raw(task)["test"]) == (None, "no test split ('test' has no labels)")
    assert _labelled_test(task.model_copy(update={"test_split": None}), None)[1] == \
        "no test split (task.test_split is null)"
    with pytest.raises(RankoptError, match="no 'heldout' file"):
        load_raw(task.model_copy(update={"test_split": "heldout"}))


def _accuracy_by_hand(root: Path, adapter: Path) -> float:
    """The exported adapter, loaded by PEFT, on the test rows: the score computed without rankopt."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()]
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(root / "model", num_labels=2),
                                      str(adapter)).eval()
    enc = AutoTokenizer.from_pretrained(adapter)([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).tolist()
    return sum(p == ("negative", "positive").index(r["label"]) for p, r in zip(predicted, rows)) / len(rows)


def test_only_the_selected_trial_is_scored_and_it_is_logged(tiny, tmp_path):
    from rankopt.outputs.export import export

    best = tiny.study.best_trial
    scores = holdout.recorded(tiny.study)
    assert list(scores) == [best.number]  # never the other trials: the test split chose nothing
    entry = scores[best.number]
    assert entry["split"] == "test" and entry["examples"] == 24
    assert tiny.result.best[0].test_metric == entry["metrics"]["accuracy"]
    run = tiny.client.get_run(best.user_attrs["mlflow_run_id"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(entry["metrics"]["accuracy"])
    others = [t for t in tiny.study.trials if t.number != best.number]
    assert all("test_accuracy" not in tiny.client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics for t in others)
    parent = tiny.client.get_run(tiny.result.parent_run_id)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(entry["metrics"]["accuracy"])
    out = tmp_path / "best"
    exported = export(out, study="tiny", storage=tiny.storage)
    assert exported.test_metric == entry["metrics"]["accuracy"]
    assert _accuracy_by_hand(tiny.root, out) == pytest.approx(entry["metrics"]["accuracy"])
    assert f"| accuracy (test, held out) | {entry['metrics']['accuracy']:.4f} (24 examples of split 'test') |" in \
        (out / "README.md").read_text()


def test_exporting_another_trial_scores_it_once(tiny, tmp_path):
    from rankopt.outputs.export import export

    other = next(t for t in tiny.study.trials if t.number != tiny.study.best_trial.number)
    first = export(tmp_path / "a", study="tiny", storage=tiny.storage, trial=other.number)
    reloaded = optuna.load_study(study_name="tiny", storage=tiny.storage)
    assert holdout.recorded(reloaded)[other.number]["metrics"]["accuracy"] == first.test_metric
    assert _accuracy_by_hand(tiny.root, tmp_path / "a") == pytest.approx(first.test_metric)
    run = tiny.client.get_run(other.user_attrs["mlflow_run_id"])
    assert len(tiny.client.get_metric_history(run.info.run_id, "test_accuracy")) == 1
    export(tmp_path / "b", study="tiny", storage=tiny.storage, trial=other.number)
    assert len(tiny.client.get_metric_history(run.info.run_id, "test_accuracy")) == 1  # not scored twice


def test_the_result_table_shows_test_beside_validation(tiny):
    from rich.console import Console

    from rankopt.training.progress import print_tune_result

    console = Console(record=True, width=200)
    print_tune_result(tiny.result, console)
    text = console.export_text()
    best = tiny.result.best[0]
    assert "validation accuracy" in text and "test accuracy" in text
    assert f"{best.metric:.4f}" in text and f"{best.test_metric:.4f}" in text
    assert "test: split 'test'" in text


def test_without_a_test_split_the_table_says_so(tiny, tmp_path):
    from rich.console import Console

    from rankopt.search.tuner import tune
    from rankopt.training.progress import print_tune_result

    result = tune(str(tiny.preset), {"task.test_split": None}, n_trials=1, study_name="no-test", out=tmp_path)
    assert result.best[0].test_metric is None and holdout.recorded(result.study) == {}
    console = Console(record=True, width=200)
    print_tune_result(result, console)
    assert "no test split" in console.export_text()


def test_cli_tune_prints_the_test_score(tiny, tmp_path):
    from rankopt.cli import app

    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["tune", str(tiny.preset), "--trials", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = holdout.recorded(optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'optuna.db'}"))
    (entry,) = scores.values()
    assert "test accuracy" in result.stdout and f"{entry['metrics']['accuracy']:.4f}" in result.stdout


def test_the_report_shows_the_test_score_of_the_scored_trials(tiny, tmp_path):
    import re

    from rankopt.outputs.report import report

    page = report("tiny", storage=tiny.storage, out=tmp_path / "r").html.read_text()
    best = tiny.study.best_trial
    value = holdout.score_of(tiny.study, best.number, "accuracy")
    assert f"<tr><th>accuracy (test, held out)</th><td>{value:.4g}</td></tr>" in page
    table = re.search(r'<table id="trials">(.*?)</table>', page, re.S).group(1)
    assert "<th>test accuracy</th>" in table
    row = re.search(rf'<tr class="best"><td>{best.number}</td>(.*?)</tr>', table, re.S).group(1)
    assert f"<td>{value:.4g}</td>" in row


def test_an_export_whose_test_data_went_away_still_exports(tiny, tmp_path, monkeypatch):
    import rankopt.training.setup
    from rankopt.outputs.export import export

    monkeypatch.setattr(rankopt.training.setup, "_DATA_CACHE", {})  # a fresh process: the data is read again

    reloaded = optuna.load_study(study_name="tiny", storage=tiny.storage)
    unscored = [t for t in reloaded.trials if t.number not in holdout.recorded(reloaded)]
    assert unscored, "the module's study has three trials; at most two are scored by the tests before this one"
    data, moved = tiny.root / "data", tiny.root / "data-moved"
    data.rename(moved)
    try:
        result = export(tmp_path / "a", study="tiny", storage=tiny.storage, trial=unscored[0].number)
    finally:
        moved.rename(data)
    assert result.test_metric is None and result.test_note.startswith("not measured (")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert "| accuracy (test, held out) | not measured (" in (tmp_path / "a" / "README.md").read_text()
