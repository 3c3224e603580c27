"""rankopt report: the self-contained HTML page, its PNGs, the MLflow artifacts, one-line errors, a browser.

One real 4-trial study (three budgets complete, one pruned) on the tiny random BERT of conftest.py
is shared by the module; the two-objective and error cases use studies written directly with
Optuna, no training.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from PIL import Image
from typer.testing import CliRunner

from rankopt.cli import app
from rankopt.training.events import Callback
from rankopt.outputs.report import _folder_name, layer_type, non_dominated, report
from rankopt.search.trials import default_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUDGETS = (1.0, 3.0, 2.0, 4.0)  # controller.target_rank of trials 0-3; trial 3 is pruned
PNG = b"\x89PNG\r\n\x1a\n"
SCREENSHOT_COPY = Path("/tmp/rankopt_report.png")


class _PruneAtSecondEval(Callback):
    """Stops one trial the way a pruner would, after it reported twice: deterministic, unlike a real pruner."""

    def __init__(self):
        self.evals = 0

    def on_eval(self, step, metrics) -> None:
        self.evals += 1
        if self.evals == 2:
            raise optuna.TrialPruned(f"pruned at step {step}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    from rankopt.config import Config
    from rankopt.search.tuner import tune

    out = tmp_path_factory.mktemp("report") / "runs"
    out.mkdir()
    cfg = Config.model_validate({
        "task": {"name": "tiny", "data_dir": str(tiny_data_dir), "text_columns": ["text"], "metric": "accuracy",
                 "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        "adapter": {"init_rank": 4, "alpha": 8.0},
        "training": {"steps": 20, "batch_size": 8, "eval_batch_size": 64, "lr": 5e-2, "eval_every": 5, "seed": 0},
        "controller": {"target_rank": 2.0, "min_rank": 1, "max_rank": 6, "warmup": 0.1, "final": 0.2, "interval": 2},
        "search": {"sampler": "random", "pruner": "none", "n_trials": len(BUDGETS),
                   "space": {"controller.target_rank": {"type": "float", "low": 1.0, "high": 4.0}}},
    })
    pinned = optuna.create_study(storage=default_storage(out), study_name="tiny", direction="maximize")
    for budget in BUDGETS:
        pinned.enqueue_trial({"controller.target_rank": budget})
    result = tune(cfg, out=out,
                  callbacks_for_trial=lambda trial, _: [_PruneAtSecondEval()] if trial.number == 3 else [])
    assert (result.n_complete, result.n_pruned) == (3, 1)
    return SimpleNamespace(out=out, study=result.study, parent=result.parent_run_id, storage=default_storage(out),
                           tracking=f"sqlite:///{out / 'mlflow.db'}")


def invoke(*args: str):
    return CliRunner().invoke(app, ["report", *args])


def embedded_pngs(page: str) -> list[bytes]:
    sources = re.findall(r"<img src=\"([^\"]*)\"", page)
    assert len(sources) == page.count("<img ")
    assert all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    return [base64.b64decode(s.split(",", 1)[1], validate=True) for s in sources]


def assert_valid_png(data: bytes) -> None:
    assert data.startswith(PNG)
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.size[0] > 100 and image.size[1] > 100


def summary(page: str) -> dict[str, str]:
    table = re.search(r'<table id="summary">(.*?)</table>', page, re.S).group(1)
    return dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table))


# ---------------------------------------------------------------------------------------------
# the real study


def test_report_writes_one_self_contained_page_by_default_beside_the_study(tiny):
    result = invoke("--study", "tiny", "--storage", tiny.storage)
    assert result.exit_code == 0, result.output
    html = tiny.out / "reports" / "tiny" / "report.html"  # beside optuna.db, like the other stores
    assert str(html) in result.stdout and html.is_file()
    page = html.read_text()
    figures = ["rank_heatmap.png", "rank_by_layer_type.png", "metric_vs_budget.png", "pareto_front.png",
               "optimization_history.png"]
    images = embedded_pngs(page)
    assert len(images) == len(figures)
    for name, data in zip(figures, images):  # page order, each the PNG written beside the page
        assert_valid_png(data)
        assert (html.parent / name).read_bytes() == data
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from elsewhere
    best = tiny.study.best_trial
    rows = summary(page)
    assert rows["study"] == "tiny" and rows["best trial"] == str(best.number)
    assert rows["trials"].startswith("3 complete, 1 pruned, 0 failed")
    assert rows["accuracy (validation, chose the trial)"] == f"{best.value:.4g}"
    assert rows["accuracy (test, held out)"] == "no test split (the data has no &#39;test&#39; split)"
    assert rows["total rank"] == str(best.user_attrs["total_rank"])
    assert rows["adapter params"] == f"{best.user_attrs['adapter_params']:,}"
    assert rows["parameters"] == f"controller.target_rank={best.params['controller.target_rank']:.4g}"
    assert "<title>rankopt report: tiny</title>" in page


def test_report_is_logged_to_the_study_parent_run(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    result = report("tiny", storage=tiny.storage, out=tmp_path / "r")
    assert result.run_id == tiny.parent and result.best_trial == tiny.study.best_trial.number
    client = MlflowClient(tracking_uri=tiny.tracking)
    logged = {Path(f.path).name for f in client.list_artifacts(tiny.parent, "report")}
    assert logged == {"report.html", *result.figures}
    copy = client.download_artifacts(tiny.parent, "report/report.html", str(tmp_path / "dl"))
    assert Path(copy).read_text() == result.html.read_text()


def test_existing_report_is_kept_without_force(tiny, tmp_path):
    out = tmp_path / "r"
    assert invoke("--study", "tiny", "--storage", tiny.storage, "--out", str(out)).exit_code == 0
    html = out / "report.html"
    html.write_text("an older report")
    result = invoke("--study", "tiny", "--storage", tiny.storage, "--out", str(out))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {out} already exists") and len(result.stderr.strip().splitlines()) == 1
    assert html.read_text() == "an older report"
    assert invoke("--study", "tiny", "--storage", tiny.storage, "--out", str(out), "--force").exit_code == 0
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left


def test_force_does_not_replace_a_folder_rankopt_did_not_write(tiny, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    result = invoke("--study", "tiny", "--storage", tiny.storage, "--out", str(out), "--force")
    assert result.exit_code == 2 and "was not written by rankopt" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.parametrize("args, message", [
    (["--study", "nope"], "error: no study 'nope' in sqlite:///"),
    (["--study", "tiny", "--storage", "sqlite:///{missing}/optuna.db"], "error: no Optuna storage at"),
    (["--study", "tiny", "--storage", "postgresql://nobody@127.0.0.1:1/optuna"], "error: cannot open Optuna storage"),
    (["--study", "tiny", "--tracking-uri", "sqlite:///{missing}/mlflow.db"], "error: no MLflow tracking store at"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
    if "--storage" not in args:
        args += ["--storage", tiny.storage]
    result = invoke(*args, "--out", str(tmp_path / "r"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_browser_renders_every_figure(tiny, tmp_path):
    from selenium.webdriver.common.by import By
    from test_ui_browser import _browser, _wait

    driver = _browser()  # skips, saying why, when chromium or its driver is missing
    try:
        result = report("tiny", storage=tiny.storage, out=tmp_path / "r")
        driver.get(result.html.resolve().as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == len(result.figures) == 5
        _wait(driver, lambda d: d.execute_script("return [...document.images].every(i => i.complete)"), 30)
        widths = driver.execute_script("return [...document.images].map(i => i.naturalWidth)")
        assert all(w > 0 for w in widths), widths
        assert driver.title == "rankopt report: tiny"
        assert driver.find_element(By.TAG_NAME, "h1").text == "rankopt report: study tiny"
        best = driver.find_element(By.CSS_SELECTOR, "#trials tr.best td").text
        assert best == str(tiny.study.best_trial.number)
        driver.save_screenshot(str(tmp_path / "report.png"))
        shutil.copyfile(tmp_path / "report.png", SCREENSHOT_COPY)
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------
# studies written directly with Optuna: two objectives, no MLflow, nothing complete


def _trial(number_values, state=optuna.trial.TrialState.COMPLETE, budget=2.0, ranks=None, size=None,
           intermediate=None):
    dist = {"controller.target_rank": optuna.distributions.FloatDistribution(1.0, 4.0)}
    attrs = {} if ranks is None else {"ranks": json.dumps(ranks), "total_rank": sum(ranks.values()),
                                      "adapter_params": size, "trainable_params": size + 66}
    return optuna.trial.create_trial(state=state, values=number_values, params={"controller.target_rank": budget},
                                     distributions=dist, user_attrs=attrs, intermediate_values=intermediate or {})


def _ranks(q: int, v: int) -> dict[str, int]:
    return {f"bert.encoder.layer.{i}.attention.self.{kind}": r for i in range(2)
            for kind, r in (("query", q), ("value", v))}


def test_two_objective_study_without_mlflow(tmp_path):
    storage = default_storage(tmp_path)
    study = optuna.create_study(storage=storage, study_name="two", directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["metric", "params"])
    study.set_user_attr("config", {"task": {"metric": "f1"}, "model": {"target_modules": ["query", "value"]}})
    study.add_trial(_trial([0.8, 400.0], budget=3.0, ranks=_ranks(4, 2), size=400))
    study.add_trial(_trial([0.7, 200.0], budget=1.5, ranks=_ranks(2, 1), size=200))
    study.add_trial(_trial([0.6, 300.0], budget=2.0, ranks=_ranks(2, 2), size=300))  # dominated
    study.add_trial(_trial(None, optuna.trial.TrialState.PRUNED, budget=1.0, intermediate={4: 0.5}))
    result = report("two", storage=storage)
    assert result.html == tmp_path / "reports" / "two" / "report.html"
    assert result.run_id is None and any("no MLflow runs" in n for n in result.notes)
    assert result.best_trial == 0  # the best metric on the Pareto front
    assert result.figures == ["rank_by_layer_type.png", "metric_vs_budget.png", "pareto_front.png",
                              "optimization_history.png"]
    page = result.html.read_text()
    for data in embedded_pngs(page):
        assert_valid_png(data)
    rows = summary(page)
    assert rows["best trial"] == "0" and rows["f1 (validation, chose the trial)"] == "0.8"
    assert rows["trials"] == "3 complete, 1 pruned, 0 failed"
    assert rows["f1 (test, held out)"] == "not scored"  # a study from before test scores: export scores it
    assert "note: study &#39;two&#39; has no MLflow runs" in page  # escaped, not raw


def test_study_without_a_complete_trial_is_refused(tmp_path):
    storage = default_storage(tmp_path)
    study = optuna.create_study(storage=storage, study_name="empty")
    study.add_trial(_trial(None, optuna.trial.TrialState.PRUNED, intermediate={4: 0.5}))
    result = invoke("--study", "empty", "--storage", storage)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: study 'empty' has no complete trial yet")
    assert not (tmp_path / "reports").exists()


def test_layer_type_takes_the_longest_target_suffix():
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert layer_type("bert.encoder.layer.0.attention.output.dense", targets) == "attention.output.dense"
    assert layer_type("bert.encoder.layer.11.output.dense", targets) == "output.dense"
    assert layer_type("bert.encoder.layer.1.attention.self.query", targets) == "query"
    assert layer_type("bert.encoder.layer.1.attention.self.query", None) == "attention.self.query"  # all-linear


def test_non_dominated_keeps_smaller_or_better_trials():
    points = [(0, 100, 0.9), (1, 50, 0.8), (2, 80, 0.7), (3, 50, 0.8), (4, 200, 0.9)]
    assert non_dominated(points) == {0, 1, 3}
    assert non_dominated(points, maximize=False) == {1, 2, 3}


def test_default_folder_name_stays_inside_reports():
    assert _folder_name("sst2-big") == "sst2-big"
    assert _folder_name("..") == "study" and _folder_name("../a/b") == "_a_b"
