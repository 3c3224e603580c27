"""Bad input to the CLI: malformed YAML, wrong types, impossible budgets, bad URLs.

Every case must end the same way: one line ``error: ...`` on stderr, exit code 2, no
traceback, no password on screen, and nothing written in ``--out``. The cases run in-process
(typer's CliRunner) for speed; one runs as a real subprocess to check the real console.
"""

from __future__ import annotations

import copy
import subprocess

import pytest
import yaml
from scaleout_support import SECRET, _admin, cli_env, rankopt_cmd  # noqa: F401
from typer.testing import CliRunner

from rankopt.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MALFORMED = {
    "unclosed-bracket": "task: [unclosed\n",
    "tab-indent": "task:\n\tname: x\n",
    "a-list": "- task\n- model\n",
    "empty-file": "",
    "a-scalar": "just words\n",
    "python-tag": "!!python/object/apply:os.system ['echo pwned']\n",
    "duplicate-colon": "task: name: x\n",
    "binary": b"\x00\xff\xfe\x89PNG\r\n",
}

# dotted key -> value patched into the good preset (None deletes the key)
WRONG = {
    "steps-a-word": {"training.steps": "many"},
    "lr-a-list": {"training.lr": [1, 2]},
    "section-a-number": {"training": 5},
    "negative-trials": {"search.n_trials": -3},
    "space-a-string": {"search.space": "lots"},
    "low-above-high": {"search.space": {"training.lr": {"type": "float", "low": 1, "high": 0}}},
    "space-unknown-key": {"search.space": {"no.such": {"type": "int", "low": 1, "high": 2}}},
    "space-unknown-type": {"search.space": {"training.lr": {"type": "normal"}}},
    "no-text-columns": {"task.text_columns": []},
    "metric-for-regression": {"task.metric": "pearson"},
    "device-name": {"training.device": "gpu0"},
    "grace-below-heartbeat": {"search.heartbeat_interval": 5, "search.grace_period": 3},
    "checkpoint-every-negative": {"search.checkpoint_every": -1},
    "unknown-section": {"foo": 1},
    "missing-model": {"model": None},
    "model-path-missing": {"model.name": "/no/such/model/dir"},
    "data-dir-missing": {"task.data_dir": "/no/such/data/dir"},
    "eval-every-zero": {"training.eval_every": 0},
    "trust-remote-code-a-word": {"model.trust_remote_code": "perhaps"},
    # impossible budgets
    "target-below-min-rank": {"controller.target_rank": 0.5},
    "min-above-max-rank": {"controller.min_rank": 3, "controller.max_rank": 2},
    "max-rank-above-layer": {"controller.max_rank": 1000},
    "init-rank-above-layer": {"adapter.init_rank": 64, "controller.max_rank": 64},
    "init-rank-outside-bounds": {"adapter.init_rank": 20},
}

BAD_STORAGE = ["notaurl", "foo://x", f"postgresql://u:{SECRET}@127.0.0.1:1/x", "sqlite:////no/such/dir/o.db",
               f"mysql://u:{SECRET}@127.0.0.1:1/x"]
BAD_TRACKING = ["notaurl", "ftp://x", "http://127.0.0.1:1", f"http://u:{SECRET}@127.0.0.1:1", "http://h:notaport",
                "http://"]
BAD_SET = ["training.lr=abc", "nonsense", "=3", "training..lr=1", "search.space.training.lr.low=x"]


@pytest.fixture
def good_preset(tiny_preset) -> dict:
    preset = copy.deepcopy(tiny_preset)
    preset["training"].update({"steps": 4, "eval_every": 2})
    preset["search"] = {"n_trials": 1, "space": {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}
    return preset


def _patched(preset: dict, patch: dict) -> dict:
    preset = copy.deepcopy(preset)
    for dotted, value in patch.items():
        node = preset
        *parents, last = dotted.split(".") if not dotted.startswith("search.space") else ["search", "space"]
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return preset


def _expect_one_line_error(result, out, *, mentions: str | None = None) -> str:
    stderr = result.stderr
    text = result.stdout + stderr
    assert "Traceback" not in text, text
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert SECRET not in text
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))
    if mentions:
        assert mentions in lines[0], lines[0]
    return lines[0]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=True)


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("command", ["tune", "worker"])
def test_malformed_yaml(tmp_path, case, command):
    path = tmp_path / "bad.yml"
    body = MALFORMED[case]
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    out = tmp_path / "out"
    extra = ["--study", "s", "--storage", f"sqlite:///{tmp_path / 'o.db'}"] if command == "worker" else []
    _expect_one_line_error(_invoke(command, str(path), *extra, "--out", str(out)), out)


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_types_and_impossible_budgets(tmp_path, good_preset, case):
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(_patched(good_preset, WRONG[case])))
    out = tmp_path / "out"
    _expect_one_line_error(_invoke("tune", str(path), "--out", str(out)), out)


@pytest.mark.parametrize("url", BAD_STORAGE)
def test_bad_storage_url(tmp_path, good_preset, url):
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(good_preset))
    out = tmp_path / "out"
    line = _expect_one_line_error(_invoke("tune", str(path), "--storage", url, "--out", str(out)), out,
                                  mentions="cannot open Optuna storage")
    if "@" in url:
        assert "***@" in line
    _expect_one_line_error(_invoke("worker", str(path), "--study", "s", "--storage", url, "--out", str(out)), out)


def test_storage_database_that_does_not_exist(tmp_path, good_preset):
    conn, user = _admin()
    if conn is None:
        pytest.skip(user)
    conn.close()
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(good_preset))
    out = tmp_path / "out"
    url = f"postgresql://{user}:{SECRET}@127.0.0.1:5432/rankopt_no_such_database"
    _expect_one_line_error(_invoke("tune", str(path), "--storage", url, "--out", str(out)), out,
                           mentions="cannot open Optuna storage")


@pytest.mark.parametrize("uri", BAD_TRACKING)
@pytest.mark.parametrize("command", ["tune", "train", "worker"])
def test_bad_tracking_uri(tmp_path, good_preset, uri, command):
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(good_preset))
    out = tmp_path / "out"
    extra = ["--study", "s", "--storage", f"sqlite:///{tmp_path / 'o.db'}"] if command == "worker" else []
    _expect_one_line_error(_invoke(command, str(path), *extra, "--tracking-uri", uri, "--out", str(out)), out)


@pytest.mark.parametrize("pair", BAD_SET)
def test_bad_overrides(tmp_path, good_preset, pair):
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(good_preset))
    out = tmp_path / "out"
    _expect_one_line_error(_invoke("tune", str(path), "--set", pair, "--out", str(out)), out)


@pytest.mark.parametrize("args, mentions", [
    (["--trials", "-1"], "--trials must be 0 or more"),
    (["--device", "gpu0"], "is not one of cpu"),
    (["--device", "cuda:7"], "cuda:7"),
])
def test_bad_worker_options(tmp_path, good_preset, args, mentions):
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(good_preset))
    out = tmp_path / "out"
    _expect_one_line_error(_invoke("worker", str(path), "--study", "s", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                   *args, "--out", str(out)), out, mentions=mentions)


def test_worker_without_preset_or_study(tmp_path):
    out = tmp_path / "out"
    _expect_one_line_error(_invoke("worker", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                   "--out", str(out)), out, mentions="no study 'nope'")


def test_pickle_only_model_folder_is_refused(tmp_path, good_preset, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")  # the test writes pickle; rankopt must not read it
    preset = _patched(good_preset, {"model.name": str(folder)})
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(preset))
    out = tmp_path / "out"
    _expect_one_line_error(_invoke("tune", str(path), "--out", str(out)), out, mentions="only pickle weights")


def test_real_console_shows_one_line(tmp_path):
    """The same contract through a real process: stderr is exactly one line, exit code 2."""
    path = tmp_path / "bad.yml"
    path.write_text(MALFORMED["unclosed-bracket"])
    out = tmp_path / "out"
    proc = subprocess.run(rankopt_cmd("tune", str(path), "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/x",
                                      "--out", str(out)),
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_only_when_the_preset_says_so(tmp_path, tiny_model_dir, monkeypatch, trust):
    """Weights load with use_safetensors=True, and trust_remote_code follows model.trust_remote_code."""
    from transformers import AutoModelForSequenceClassification

    from rankopt.tasks import modeling
    from rankopt.config import ModelConfig

    seen = {}
    real = AutoModelForSequenceClassification.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    modeling.clear_model_cache()
    modeling.load_pretrained(ModelConfig(name=str(tiny_model_dir), trust_remote_code=trust), 2)
    modeling.clear_model_cache()
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is trust
    assert ModelConfig(name="x").trust_remote_code is False
