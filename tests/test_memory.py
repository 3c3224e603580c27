"""Memory: gradient checkpointing that still trains adapters, SDPA attention, nothing kept alive across trials."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from rankopt.adapters import adapt
from rankopt.training.memory import enable_gradient_checkpointing

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_adapted():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    adapted = adapt(LlamaForCausalLM(config), TARGETS, 4, 8, seed=0)
    with torch.no_grad():  # lam = 0 would leave P and Q without gradient: give every factor one
        for layer in adapted.adapters.values():
            layer.lora_lam.normal_()
    return adapted.model.train(), adapted


def loss_and_grads(checkpointing: bool):
    model, adapted = tiny_llama_adapted()
    if checkpointing:
        enable_gradient_checkpointing(model)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {f"{n}.{k}": getattr(layer, k).grad for n, layer in adapted.adapters.items()
                         for k in ("lora_P", "lora_lam", "lora_Q")}, model


def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients():
    plain_loss, plain, _ = loss_and_grads(False)
    ckpt_loss, ckpt, model = loss_and_grads(True)
    assert model.is_gradient_checkpointing
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == ckpt.keys()
    for name, grad in plain.items():
        assert ckpt[name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(ckpt[name], grad, atol=1e-6, rtol=1e-5)


def test_checkpointing_is_refused_for_a_model_without_it(tiny_config):
    from rankopt.errors import RankoptError

    with pytest.raises(RankoptError, match="gradient_checkpointing: false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_decoders_load_with_sdpa_attention(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankopt.config import ModelConfig
    from rankopt.tasks.modeling import load_pretrained

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    model = load_pretrained(ModelConfig(name=str(tmp_path / "m"), target_modules=TARGETS), 0, "causal_lm")
    assert model.config._attn_implementation == "sdpa"


def test_a_five_trial_study_keeps_no_trial_model_alive(tiny_preset, tmp_path, monkeypatch):
    """At the start of every trial, the models of the trials before it (and the check model) are gone."""
    import rankopt.search.tuner as tuner
    from rankopt.config import build_config

    built: list[weakref.ref] = []
    alive_at_start: list[int] = []
    real_build = tuner.build_model

    def recording_build(cfg, num_labels, label_names=None, label_mean=None):
        alive_at_start.append(sum(ref() is not None for ref in built))
        adapted = real_build(cfg, num_labels, label_names, label_mean)
        built.append(weakref.ref(adapted.model))
        return adapted

    monkeypatch.setattr(tuner, "build_model", recording_build)
    monkeypatch.setattr(tuner, "release_memory", _counting(tuner.release_memory, calls := []))
    monkeypatch.chdir(tmp_path)
    cfg = build_config(tiny_preset, {"training.steps": 8, "training.eval_every": 4, "search.startup_trials": 1,
                                     "search.pruner": "none",  # only PruneOddTrials prunes
                                     "search.space": {"training.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}})
    prepared = tuner.prepare_study(cfg, n_trials=5, out=tmp_path / "runs", track=False)
    result = tuner.run_trials(prepared, callbacks_for_trial=lambda trial, cfg: [PruneOddTrials(trial)])
    assert result.n_complete == 3 and result.n_pruned == 2
    # one build checks the preset in prepare_study, then one per trial: each finds every earlier model freed
    assert alive_at_start == [0] * 6
    assert len(calls) == 10  # before and after each trial
    gc.collect()
    assert sum(ref() is not None for ref in built) == 0


class PruneOddTrials:
    """Prunes trials 1 and 3 at their first evaluation: the exception's frames hold the model in a cycle."""

    def __init__(self, trial):
        self.number = trial.number

    def __getattr__(self, name):
        return lambda *args: None

    def on_eval(self, step, metrics):
        import optuna

        if self.number % 2:
            raise optuna.TrialPruned("pruned by the test")


def _counting(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper
