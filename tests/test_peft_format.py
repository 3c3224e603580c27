"""PEFT's on-disk format for adapters whose ranks differ per layer, down to layers with no adapter at all."""

from __future__ import annotations

import json

import torch

from rankopt.adapters.model import adapt
from rankopt.adapters.peft_format import save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_decoder(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval()


def test_layers_pruned_to_rank_zero_are_left_out_and_peft_loads_the_rest_exactly(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapted = adapt(tiny_decoder(tmp_path / "base"), TARGETS, rank=3, alpha=6, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted.adapters.values():
            layer.lora_lam.copy_(torch.randn(layer.rank, generator=gen))
    gone = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    for name in gone:
        adapted.adapters[name].resize(torch.tensor([], dtype=torch.long), n_new=0)
    folder = save_adapter(adapted, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not set(gone) & set(config["target_modules"]) and len(config["target_modules"]) == len(TARGETS) * 2 - 2
    assert not set(gone) & set(config["rank_pattern"])
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), folder).eval()
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    with torch.no_grad():
        expected = adapted.model.eval()(input_ids=ids).logits
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)
