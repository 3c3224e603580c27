"""The README's Python API examples run as written (real MiniLM, offline demo data), in order."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section, before its subsections."""
    section = README.read_text().split("## Python API", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_one_example_per_verb():
    code = "\n".join(api_examples())
    for call in ("rankopt.train(", "rankopt.tune(", "rankopt.export(", "rankopt.report("):
        assert call in code


@pytest.mark.integration
def test_readme_python_examples_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one per xdist worker
    outputs = []
    for block in api_examples():
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    trained = re.search(r"accuracy 0\.\d{3}, total rank (\d+) over 36 layers, (\d+) adapter params", outputs[0])
    assert trained, outputs[0]
    # the default parameter budget: MiniLM's 36 linears at rank 3 (24 of 384+384+1, 12 of 384+1536+1 per component),
    # short of it by less than one component, whatever ranks the controller gave each layer
    uniform = 3 * (24 * 769 + 12 * 1921)
    assert uniform - 1921 < int(trained[2]) <= uniform, outputs[0]
    assert re.search(r"best trial \d: 0\.\d{3} at total rank \d+", outputs[1]), outputs[1]
    adapter = json.loads((tmp_path / "adapters" / "demo" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "SEQ_CLS"
    assert (tmp_path / "runs" / "reports" / "demo" / "report.html").is_file()
    assert str(tmp_path / "runs" / "reports" / "demo" / "report.html") in outputs[2] or \
        "runs/reports/demo/report.html" in outputs[2]
