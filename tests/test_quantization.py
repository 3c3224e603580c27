"""QLoRA: a 4-bit (nf4) or 8-bit base through bitsandbytes, float32 adapters over it, on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import assert_size_of_uniform_rank
from rankopt.config import ModelConfig, build_config
from rankopt.errors import RankoptError
from rankopt.outputs.export import check_mergeable
from rankopt.training.setup import build_model
from rankopt.training.trainer import train_adapted

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("qllama") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.2, pad_token_id=0)).save_pretrained(folder)
    return folder


def q_config(llama_dir, quantization, **training):
    return build_config({
        "task": {"name": "q", "type": "causal_lm", "builtin": "chatterbot_dialogs", "metric": "loss"},
        "model": {"name": str(llama_dir), "target_modules": TARGETS, "quantization": quantization},
        "adapter": {"init_rank": 4, "alpha": 8},
        "training": {"steps": 12, "batch_size": 8, "lr": 1e-2, "eval_every": 12, "warmup_ratio": 0.0, **training},
        "controller": {"target_rank": 2, "max_rank": 8, "interval": 3}})


@pytest.fixture(scope="module")
def lm_data():
    from test_accumulation import TaskData, lm_rows, pad_collate

    return TaskData(train=lm_rows(48, 1), eval=lm_rows(16, 2), num_labels=0, label_names=None, collator=pad_collate)


def train_4bit(llama_dir, lm_data):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = q_config(llama_dir, "4bit")
    adapted = build_model(cfg, 0)
    layer = adapted.adapters["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base, bnb.nn.Linear4bit) and layer.base.weight.dtype == torch.uint8
    assert (layer.in_features, layer.out_features) == (64, 64)  # from the module, not the packed weight
    assert all(p.dtype == torch.float32 for p in adapted.trainable_parameters())
    assert float(layer.delta_weight().abs().max()) == 0.0  # lam starts at 0
    result = train_adapted(cfg, adapted, lm_data)
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert_size_of_uniform_rank(adapted.adapters.values(), 2)  # the default parameter budget
    kept = [l for l in adapted.adapters.values() if l.rank > 0]  # min_rank 0: a layer may give its adapter up
    assert kept and all(float(l.delta_weight().abs().max()) > 0 for l in kept)
    return adapted, cfg


def test_4bit_base_trains_float32_adapters_on_the_cpu(llama_dir, lm_data):
    train_4bit(llama_dir, lm_data)


def test_4bit_adapter_exports_for_the_unquantized_base_and_loads_in_peft(llama_dir, lm_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from rankopt.adapters.peft_format import save_adapter

    adapted, cfg = train_4bit(llama_dir, lm_data)
    out = save_adapter(adapted, tmp_path / "adapter", base_model=cfg.model.name)
    base = LlamaForCausalLM.from_pretrained(llama_dir)  # the plain, unquantized base
    peft = PeftModel.from_pretrained(base, str(out))
    ids = torch.randint(1, 64, (2, 6))
    x = torch.randn(3, 64)
    for name, layer in adapted.adapters.items():  # a layer at rank 0 (min_rank 0) is left out of the export
        lora = peft.base_model.model.get_submodule(name)
        if layer.rank == 0:
            assert not hasattr(lora, "base_layer")
            continue
        torch.testing.assert_close(lora(x) - lora.base_layer(x), (layer(x) - layer.base(x)).float(), atol=1e-5,
                                   rtol=1e-4)
    assert torch.isfinite(peft(input_ids=ids).logits).all()


def test_8bit_base_loads_and_steps(llama_dir, lm_data):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = q_config(llama_dir, "8bit", steps=2, eval_every=2)
    adapted = build_model(cfg, 0)
    assert isinstance(adapted.adapters["model.layers.1.mlp.down_proj"].base, bnb.nn.Linear8bitLt)
    result = train_adapted(cfg, adapted, lm_data)
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))


def test_missing_bitsandbytes_is_one_line_error(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(RankoptError) as excinfo:
        build_model(q_config(llama_dir, "4bit"), 0)
    assert "rankopt[quant]" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_merge_refuses_a_quantized_base_saying_how():
    check_mergeable(ModelConfig(name="meta-llama/Llama-3.1-8B"))  # a plain base merges
    with pytest.raises(RankoptError) as excinfo:
        check_mergeable(ModelConfig(name="meta-llama/Llama-3.1-8B", quantization="4bit"))
    message = str(excinfo.value)
    assert "without --merge" in message and "bfloat16" in message and "\n" not in message
