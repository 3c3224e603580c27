"""The memory plan: each part's arithmetic against the real thing, the refusal, the figures for Llama-3-8B.

Models are configs written in code (a ``config.json`` alone, no weights: the plan never reads
any); where a part can be checked against reality cheaply it is (the bytes of a loaded model, a
bitsandbytes-quantized one, adapters at max_rank). The whole plan against a measured peak is
``test_memory_plan_measured.py``.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

from rankopt.config import ModelConfig, build_config
from rankopt.errors import RankoptError
from rankopt.tasks.architectures import meta_model
from rankopt.training.memory_parts import LOSS_BYTES_PER_LOGIT
from rankopt.training.memory_plan import GiB, INIT, TRAIN, estimate, gib, parse_size
from rankopt.training.model_shapes import NF4_BYTES_PER_WEIGHT, weight_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(tie: bool = True, hidden: int = 64, intermediate: int = 160) -> LlamaConfig:
    return LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=tie, pad_token_id=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny Llama's config.json and nothing else."""
    folder = tmp_path_factory.mktemp("plan") / "llama"
    tiny_llama().save_pretrained(folder)
    return folder


def lm_config(name: str, **sections):
    raw = {"task": {"name": "plan", "type": "causal_lm", "builtin": "chatterbot_dialogs", "metric": "loss",
                    "max_length": 32},
           "model": {"name": name, "target_modules": LLAMA_TARGETS},
           "adapter": {"init_rank": 4, "dropout": 0.0},
           "training": {"batch_size": 4},
           "controller": {"target_rank": 4, "max_rank": 8}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


def part(plan, name):
    return next(p for p in plan.parts if p.name == name)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes a loaded model really holds: every distinct storage, bitsandbytes' quantization state included."""
    storages = {}
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code]
                                                     if state.nested else [])
        if getattr(p, "SCB", None) is not None:
            tensors.append(p.SCB)
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_base_weights_are_what_the_model_holds(tie, dtype):
    config = tiny_llama(tie)
    real = LlamaForCausalLM(config).to(dtype)
    estimated, _ = weight_bytes(meta_model(config, "causal_lm"), ModelConfig(name="x", dtype="auto"), dtype)
    assert estimated == pytest.approx(stored_bytes(real), abs=64)  # .to(bf16) also halves RoPE's 16 inv_freq floats


def test_a_classifier_head_is_counted_in_float32():
    from rankopt.training.precision import keep_head_float32
    from transformers import BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3)
    real = BertForSequenceClassification(config).to(torch.bfloat16)
    keep_head_float32(real, ["classifier"])
    estimated, _ = weight_bytes(meta_model(config, "classification", 3), ModelConfig(name="x"), torch.bfloat16)
    assert estimated == stored_bytes(real)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_weights_are_what_bitsandbytes_stores(quantization, tmp_path):
    pytest.importorskip("bitsandbytes")
    from rankopt.tasks.modeling import load_pretrained

    config = tiny_llama(hidden=512, intermediate=1024)  # big enough for per-tensor constants not to matter
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name=str(tmp_path / "m"), quantization=quantization, dtype="float32")
    real = load_pretrained(cfg, 0, "causal_lm", "cpu")
    estimated, how = weight_bytes(meta_model(config, "causal_lm"), cfg, torch.float32)
    assert estimated == pytest.approx(stored_bytes(real), rel=0.01)
    assert quantization in how


def test_4bit_arithmetic_on_llama_3_8b():
    """7B of Llama-3-8B's 8B weights are decoder linears (nf4); embeddings, LM head and norms stay bf16."""
    plan = estimate(lm_config("meta-llama/Llama-3.1-8B-Instruct", model={"quantization": "4bit"}), device_memory="80GB")
    linears = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)
    others = 2 * 128256 * 4096 + 65 * 4096
    assert part(plan, "base weights").bytes == pytest.approx(linears * NF4_BYTES_PER_WEIGHT + 2 * others, rel=1e-4)


def test_adapters_are_counted_at_max_rank_with_adamw_state(llama_dir):
    """20 bytes per trained value: float32 value, gradient, two moments and the per-element step count."""
    from rankopt.adapters.model import adapt

    cfg = lm_config(str(llama_dir))
    adapted = adapt(LlamaForCausalLM(tiny_llama()), LLAMA_TARGETS, rank=cfg.controller.max_rank, alpha=8)
    plan = estimate(cfg)
    assert part(plan, "adapters + AdamW").bytes == 20 * adapted.count_trainable()


def test_logits_probe_and_data_parallel_shards(llama_dir):
    cfg = lm_config(str(llama_dir), training={"batch_size": 8, "grad_accum_steps": 2},
                    controller={"probe_tokens": 64})
    one, four = estimate(cfg), estimate(cfg, processes=4)
    tokens = 8 * 32
    assert part(one, "logits + loss").bytes == LOSS_BYTES_PER_LOGIT * tokens * 100
    # the probe's rows of every adapted layer's input (float32 here), and of its output gradient for
    # the earlier half of the step's micro-batches
    inputs = 2 * 64 * (64 * 6 + 160)
    grads = 2 * 64 * (64 + 32 + 32 + 64 + 160 + 160 + 64)
    assert part(one, "gradient probe").bytes == 4 * (inputs + grads // 2)
    # each of 4 processes holds a quarter of every micro-batch (and of the probe's rows)
    assert part(four, "logits + loss").bytes == part(one, "logits + loss").bytes // 4
    smaller = estimate(lm_config(str(llama_dir), training={"batch_size": 2, "grad_accum_steps": 2}))
    assert part(four, "activations").bytes == part(smaller, "activations").bytes
    with pytest.raises(RankoptError, match="batch_size=8 .* does not split over 3 processes"):
        estimate(cfg, processes=3)


def test_checkpointing_keeps_one_block_input_per_layer(llama_dir):
    off = estimate(lm_config(str(llama_dir), training={"gradient_checkpointing": False}))
    on = estimate(lm_config(str(llama_dir), training={"gradient_checkpointing": True}))
    assert part(on, "activations").bytes < part(off, "activations").bytes
    assert f"(on: {gib(part(on, 'activations').bytes)})" in part(off, "activations").detail


def test_the_init_pass_is_a_phase_of_its_own(llama_dir):
    plan = estimate(lm_config(str(llama_dir)))
    assert {p.name for p in plan.parts if INIT in p.phases} >= {"init pass: activations", "init pass: chunked loss"}
    random_start = estimate(lm_config(str(llama_dir), adapter={"init": "random"}))
    assert not any(INIT in p.phases and p.name.startswith("init") for p in random_start.parts)


def test_llama_3_8b_plans_offline_from_its_bundled_config():
    """llm_gpu's model needs no hub to plan: 8.03B bf16 weights; the shipped preset fits 80 GB."""
    from rankopt.config import load_config

    cfg = load_config("llm_gpu")
    plan = estimate(cfg, device_memory="80GB")
    assert part(plan, "base weights").bytes == pytest.approx(2 * 8.03e9, rel=1e-3)
    assert plan.fits and plan.peak_phase == TRAIN
    assert estimate(cfg).fits is None  # training.device cuda on a machine without one: no verdict, no refusal
    quantized = estimate(load_config("llm_gpu", ["model.quantization=4bit"]), device_memory="10GB")
    assert quantized.fits is False
    message = quantized.refusal()
    top = quantized.largest()
    assert top.name in message and top.knob in message and "\n" not in message
    assert "10.0 GiB" in message and gib(quantized.peak) in message


def test_parse_size():
    assert parse_size("80GB") == parse_size("80 GiB") == 80 * GiB
    assert parse_size("512MB") == 512 << 20 and parse_size("1.5T") == int(1.5 * (1 << 40))
    for bad in ("lots", "-3GB", "0GB", "12 PB"):
        with pytest.raises(RankoptError, match="--device-memory"):
            parse_size(bad)


def run_rankopt(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rankopt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_plan_prints_the_table_and_refuses_in_one_line_writing_nothing(tmp_path):
    proc = run_rankopt("plan", "llm_gpu", "--device-memory", "20GB", "--set", "training.batch_size=8",
                       "--nproc-per-node", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "per process at its peak" in errors[0] and "20.0 GiB (--device-memory 20GB)" in errors[0]
    assert "base weights" in proc.stdout and "each of 2 x cuda" in proc.stdout and "does not fit" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no runs/, no MLflow store


def fake_gpu(monkeypatch, memory: int) -> None:
    """This CPU machine answers like one with a GPU of ``memory`` bytes (the check reads nothing else)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=memory, name="test GPU"))


@pytest.mark.parametrize("verb", ["train", "tune"])
def test_train_and_tune_on_a_gpu_refuse_before_writing(verb, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rankopt.cli import app

    fake_gpu(monkeypatch, 16 * GiB)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [verb, "llm_gpu", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the memory plan needs"), result.output
    assert "16.0 GiB (test GPU)" in lines[0] and "RANKOPT_SKIP_MEMORY_PLAN=1" in lines[0]
    assert not out.exists()


def test_worker_on_a_gpu_refuses_before_writing(tmp_path, monkeypatch):
    from rankopt.search.worker import run_worker

    fake_gpu(monkeypatch, 16 * GiB)
    store = tmp_path / "optuna.db"
    with pytest.raises(RankoptError, match=r"memory plan needs .*\(test GPU\)"):
        run_worker("s", f"sqlite:///{store}", "llm_gpu", out=tmp_path / "out", track=False)
    assert not store.exists() and not (tmp_path / "out").exists()


def test_the_check_is_off_the_gpu_and_can_be_skipped(monkeypatch):
    from rankopt.config import load_config
    from rankopt.training.memory_plan import check_memory

    assert check_memory(load_config("llm_gpu", ["training.device=cpu"])) is None
    fake_gpu(monkeypatch, 16 * GiB)
    monkeypatch.setenv("RANKOPT_SKIP_MEMORY_PLAN", "1")
    assert check_memory(load_config("llm_gpu")) is None


def readme_plans() -> list[tuple[str, str]]:
    """(command, printed text) of every ``$ rankopt plan`` block in README's "Memory plan" section."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Memory plan", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```text\n\$ (rankopt plan [^\n]*)\n(.*?)```", section, flags=re.S)
    return [(command, text) for command, text in blocks]


def test_readme_plans_are_what_the_commands_print():
    """The Llama-3-8B figures in README are this code's: a change to the plan or llm_gpu.yml must update them."""
    from rich.console import Console

    from rankopt.api import plan
    from rankopt.training.memory_plan import print_plan

    blocks = readme_plans()
    assert len(blocks) == 4
    for command, text in blocks:
        args = shlex.split(command)[2:]
        options = dict(zip(args[1::2], args[2::2]))
        sets = [value for flag, value in zip(args[1::2], args[2::2]) if flag == "--set"]
        result = plan(args[0], sets, device_memory=options.get("--device-memory"),
                      processes=int(options.get("--nproc-per-node", 1)))
        printed = io.StringIO()
        print_plan(result, Console(width=140, file=printed, color_system=None))
        if result.fits is False:
            printed.write(f"error: {result.refusal()}\n")
        fresh = "\n".join(line.rstrip() for line in printed.getvalue().splitlines())
        assert fresh == text.rstrip("\n"), f"README's block for `{command}` is stale; it now prints:\n{fresh}"
