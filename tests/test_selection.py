"""Choosing a study's trial: the smallest adapter within DELTA of the best (``--within``), in both directions.

The rule is checked on studies written directly with Optuna (no training); one real 3-trial tiny
study checks tune, export and report end to end.
"""

from __future__ import annotations

import json
import re

import optuna
import pytest
from typer.testing import CliRunner

from rankopt.cli import app
from rankopt.errors import RankoptError
from rankopt.search import holdout
from rankopt.search.selection import select_trial, smallest_within
from tiny_project_support import make_tiny_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _study(values: list[tuple], directions: list[str], storage: str | None = None, name: str | None = None):
    """Finished trials (metric[, params value], adapter_params)."""
    study = optuna.create_study(directions=directions, storage=storage, study_name=name)
    study.set_user_attr("objectives", ["metric", "params"][:len(directions)])
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v[:len(directions)]),
                                                  user_attrs={"adapter_params": v[-1]}))
    return study


def test_the_smallest_trial_within_delta_of_the_best():
    study = _study([(0.90, 9000), (0.895, 3000), (0.85, 1000), (0.80, 500)], ["maximize"])
    assert smallest_within(study, 0.0)[0].number == 0
    assert smallest_within(study, 0.01)[0].number == 1  # 0.5 points below the best, a third of its size
    assert smallest_within(study, 0.05)[0].number == 2  # exactly 0.05 below: within
    assert smallest_within(study, 1.0)[0].number == 3
    chosen, notes, reason = select_trial(study, within=0.01)
    assert chosen.number == 1 and not notes and "within 0.01 of the best (0.9000, trial 0)" in reason


def test_a_minimised_metric_may_be_delta_higher_not_lower():
    # a loss: lower is better; trial 0 is best, trial 1 is 0.02 worse but far smaller
    study = _study([(1.00, 9000), (1.02, 3000), (1.30, 1000)], ["minimize"])
    assert smallest_within(study, 0.05)[0].number == 1
    assert smallest_within(study, 0.01)[0].number == 0
    assert smallest_within(study, 0.5)[0].number == 2


def test_ties_in_size_go_to_the_better_metric():
    study = _study([(0.90, 9000), (0.86, 3000), (0.88, 3000)], ["maximize"])
    assert smallest_within(study, 0.05)[0].number == 2


def test_two_objective_studies_pick_from_the_pareto_set():
    # trial 3 (0.84, 3500) is dominated by trial 2 (0.85, 3000); trial 4 is tiny but far worse
    study = _study([(0.90, 9000, 9000), (0.88, 6000, 6000), (0.85, 3000, 3000), (0.84, 3500, 3500),
                    (0.60, 100, 100)], ["maximize", "minimize"])
    assert smallest_within(study, 0.03)[0].number == 1
    chosen, best = smallest_within(study, 0.06)
    assert (chosen.number, best.number) == (2, 0)
    assert "Pareto-optimal" in select_trial(study, within=0.06)[2]


@pytest.mark.parametrize("delta", [-0.01, float("nan")])
def test_a_delta_must_be_a_distance(delta):
    study = _study([(0.9, 10)], ["maximize"])
    with pytest.raises(RankoptError, match="is not a distance"):
        smallest_within(study, delta)


@pytest.mark.parametrize("verb, extra", [("export", ["--out", "{out}"]), ("report", ["--out", "{out}"]),
                                         ("tune", ["demo"])])
def test_cli_refuses_a_negative_within_in_one_line(tmp_path, verb, extra):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _study([(0.9, 10)], ["maximize"], storage=storage, name="s")
    out = tmp_path / "written"
    args = [verb, *[a.format(out=out) for a in extra], "--within", "-0.5"]
    if verb != "tune":
        args += ["--study", "s", "--storage", storage]
    else:
        args += ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --within -0.5 is not a distance"), result.stderr
    assert not out.exists()


def test_cli_within_does_not_go_with_another_choice(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _study([(0.9, 10)], ["maximize"], storage=storage, name="s")
    for other in (["--trial", "0"], ["--max-params", "5"]):
        result = CliRunner().invoke(app, ["export", "--study", "s", "--storage", storage, "--out", str(tmp_path / "o"),
                                          "--within", "0.01", *other])
        assert result.exit_code == 2 and "not both" in result.stderr, result.output


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from rankopt.search.tuner import tune

    root = tmp_path_factory.mktemp("within")
    out = root / "runs"
    preset = make_tiny_project(root)
    out.mkdir()
    pinned = optuna.create_study(storage=f"sqlite:///{out / 'optuna.db'}", study_name="tiny", direction="maximize")
    for budget in (4.0, 2.5, 1.0):  # largest first: on a tie in metric the best is the largest, not the smallest
        pinned.enqueue_trial({"controller.target_rank": budget})
    result = tune(str(preset), out=out, within=1.0)
    return result, out


def test_tune_marks_and_scores_the_smallest_good_trial(tuned):
    from rich.console import Console

    from rankopt.training.progress import print_tune_result

    result, _ = tuned
    complete = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    smallest = min(complete, key=lambda t: t.user_attrs["adapter_params"])  # within 1.0: every trial qualifies
    assert result.smallest.number == smallest.number and smallest.number != result.best[0].number
    scores = holdout.recorded(result.study)
    assert set(scores) == {result.best[0].number, smallest.number}  # both selected, both scored once
    assert result.smallest.test_metric == scores[smallest.number]["metrics"]["accuracy"]
    console = Console(record=True, width=250)
    print_tune_result(result, console)
    # the smallest trial's row, found by its number: another trial may have the same adapter size
    rows = [line.split("│") for line in console.export_text().splitlines() if line.startswith("│")]
    row = next(cells for cells in rows if cells[1].strip() == str(smallest.number))
    assert f"{smallest.user_attrs['adapter_params']:,}" in "│".join(row)
    assert "smallest within 1" in "│".join(row)


def test_export_and_report_take_the_same_trial(tuned, tmp_path):
    result, out = tuned
    storage = f"sqlite:///{out / 'optuna.db'}"
    cli = CliRunner().invoke(app, ["export", "--study", "tiny", "--storage", storage, "--out", str(tmp_path / "a"),
                                   "--within", "1"])
    assert cli.exit_code == 0, cli.output
    assert f"trial {result.smallest.number} of study 'tiny' (fewest adapter params" in cli.stdout
    meta = json.loads((tmp_path / "a" / "rankopt.json").read_text())
    assert meta["export"]["trial"] == result.smallest.number
    assert "--within 1.0" in meta["export"]["command"]
    assert "within 1 of the best" in (tmp_path / "a" / "README.md").read_text()
    from rankopt.outputs.report import report

    page = report("tiny", storage=storage, out=tmp_path / "r", within=1.0).html.read_text()
    assert re.search(rf'<tr class="smallest"><td>{result.smallest.number} \(smallest within the margin\)', page)
    assert "<th>smallest within 1 of the best</th>" in page
