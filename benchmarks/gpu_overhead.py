"""The overhead benchmark on a GPU: a randomly initialised ~1.1B-parameter decoder in bf16, rankopt vs PEFT.

A Llama-shaped causal LM (TinyLlama's shape: hidden 2048, 22 layers, FFN 5632, 32 heads with
4 key/value heads, vocabulary 32000: 1.1B parameters) drawn at random from one seed, so
nothing is downloaded. Every run starts from the same weights, adapts the same 154 linears
(q, k, v, o, gate, up, down) and trains on the same random token batches with next-token loss
(``labels = input_ids``), through the same AdamW + schedule + clipping, under bf16 autocast:

* ``rankopt adaptive, budget R`` (controller on, budget kept at R per layer: like for like),
  ``rankopt adaptive, budget R->R/2``, ``rankopt fixed r=R`` (controller off);
* ``PEFT LoRA r=R`` (alpha 2R, the baseline of every ratio), ``PEFT AdaLoRA 1.5R->R``.

Both keep float32 adapters on the bf16 base (rankopt always; PEFT by its default
``autocast_adapter_dtype=True``); the adapter dtype is shown in the table. Three variants
(``--variants``), each a block of its own: ``plain``; ``ckpt``, gradient checkpointing
(non-reentrant) for both; ``4bit``, the base's decoder linears in bitsandbytes nf4 (QLoRA; the
embeddings and LM head stay bf16). ``ckpt`` and ``4bit`` run adaptive, LoRA and AdaLoRA only.
Targets (issue 13): rankopt <= 1.03x PEFT LoRA's median step time, <= 1.05x its peak memory,
faster than AdaLoRA.

Time: within a variant the runs alternate step by step (who goes first rotates), synchronised
around every step; median and mean over the timed steps. Memory (CUDA only): each run alone,
built and stepped ``--memory-steps`` times on a schedule compressed to that length (so
reallocations happen); its peak ``torch.cuda.max_memory_allocated`` above what was allocated
before it was built (its copy of the weights, adapters, optimizer and controller state, activations).

    python benchmarks/gpu_overhead.py                          # ~6-8 min on one H100/H200
    python benchmarks/gpu_overhead.py --tiny --device cpu --steps 2 --warmup 1 --memory-steps 2  # smoke (CPU)

Several GPUs (issue 14): ``--nproc-per-node N`` runs every run data-parallel on N processes, one
GPU each (``torch.distributed.run`` underneath, NCCL), on the same global batches of ``--batch``
rows: rankopt shards each batch and sums its gradients itself, PEFT LoRA runs under
DistributedDataParallel on its shard. AdaLoRA is left out there (PEFT's AdaLoRA loses its
``rank_pattern`` under DDP). Times and memory are rank 0's.

    python benchmarks/gpu_overhead.py --nproc-per-node 8 --batch 64 --variants plain ckpt   # one 8-GPU node
    python benchmarks/gpu_overhead.py --tiny --device cpu --nproc-per-node 2 --variants plain --steps 2 \
        --warmup 1 --batch 4 --seq 16 --rank 4          # smoke (2 gloo processes)

Without a CUDA GPU (and without ``--device cpu``) it exits with code 2 and says so. Without
bitsandbytes the ``4bit`` variant is skipped, with a note saying so. rankopt is imported from this
checkout (the repository root goes first on ``sys.path``), so a bare GPU machine needs no install
of it, only what ``benchmarks/gpu_carry.sh`` carries (pydantic and datasets):

    bash benchmarks/gpu_carry.sh unpack && PYTHONPATH=/tmp/site python3 benchmarks/gpu_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import platform
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # this checkout's rankopt, whatever else is installed
from overhead_vs_peft import adalora_init  # noqa: E402
from peft_baselines import PeftStepper  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = {
    "adaptive": "rankopt adaptive, budget {r}",
    "adaptive-prune": "rankopt adaptive, budget {r}->{half}",
    "fixed": "rankopt fixed r={r}",
    "lora": "PEFT LoRA r={r}",
    "adalora": "PEFT AdaLoRA {init}->{r}",
}
VARIANTS = {"plain": list(RUNS), "ckpt": ["adaptive", "lora", "adalora"], "4bit": ["adaptive", "lora", "adalora"]}
NOT_DATA_PARALLEL = {"adalora"}  # PEFT's AdaLoRA loses its rank_pattern under DDP


def variant_runs(variant: str, parallel: bool) -> list[str]:
    return [k for k in VARIANTS[variant] if not (parallel and k in NOT_DATA_PARALLEL)]
SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "1b": (2048, 22, 5632, 32, 4, 32000),
    "tiny": (64, 2, 128, 4, 2, 256),
}


def build_base(args: argparse.Namespace, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The random decoder, built directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab = SHAPES["tiny" if args.tiny else "1b"]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=args.layers or layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(args.seq, 2048), attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def rankopt_config(args: argparse.Namespace, key: str, total: int, device: str, variant: str):
    from rankopt.config import build_config

    r = args.rank
    controller = {"enabled": key != "fixed", "target_rank": r // 2 if key == "adaptive-prune" else r,
                  "min_rank": 1, "max_rank": 2 * r, "warmup": 0.1, "final": 0.2, "interval": 10}
    raw = {"task": {"name": "gpu-overhead", "type": "causal_lm", "builtin": "chatterbot_dialogs",
                    "metric": "loss"},  # not loaded
           "model": {"name": "random-llama", "target_modules": TARGETS},
           "adapter": {"init_rank": r, "alpha": 2 * r},
           "training": {"steps": total, "batch_size": args.batch, "eval_every": total, "lr": args.lr,
                        "device": device, "seed": 0, "precision": "bf16" if args.dtype == "bf16" else "fp32",
                        "gradient_checkpointing": variant == "ckpt"},
           "controller": controller}
    return build_config(raw)


def quantized_base(args: argparse.Namespace, base: torch.nn.Module, device: str, folder: Path) -> torch.nn.Module:
    """``base`` with its decoder linears in nf4, loaded the way rankopt loads model.quantization: 4bit."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        base.save_pretrained(folder)
    compute = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": device}, dtype=compute)


def build_run(args: argparse.Namespace, key: str, base: torch.nn.Module, total: int, device: str,
              variant: str = "plain", quant_dir: Path | None = None):
    """(stepper, model, adapter dtype) for run ``key`` of ``variant`` on a copy of ``base``."""
    model = quantized_base(args, base, device, quant_dir) if variant == "4bit" else copy.deepcopy(base)
    model.train()
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    if key in ("adaptive", "adaptive-prune", "fixed"):
        from rankopt.adapters import adapt
        from rankopt.training.trainer import Stepper

        cfg = rankopt_config(args, key, total, device, variant)
        adapted = adapt(model, TARGETS, cfg.adapter.init_rank, cfg.adapter.alpha, seed=0)
        dtype = next(iter(adapted.adapters.values())).lora_P.dtype
        return Stepper(cfg, adapted), model, dtype
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if variant == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    r = args.rank
    common = {"task_type": "CAUSAL_LM", "target_modules": TARGETS, "lora_dropout": 0.0}
    if key == "lora":
        config = LoraConfig(r=r, lora_alpha=2 * r, **common)
    else:
        init = adalora_init(r)
        config = AdaLoraConfig(init_r=init, target_r=r, lora_alpha=2 * init, total_step=total,
                               tinit=round(0.1 * total), tfinal=round(0.2 * total), deltaT=10, **common)
    torch.manual_seed(0)
    peft = get_peft_model(model, config)
    dtype = next(p.dtype for n, p in peft.named_parameters() if "lora_A" in n)
    if torch.distributed.is_initialized():  # each process steps on its shard; DDP averages the gradients
        from torch.nn.parallel import DistributedDataParallel

        peft = DistributedDataParallel(peft, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                       else None)
    stepper = PeftStepper(peft, args.lr, 0.0, "linear", total, 0.06, 1.0, adalora=key == "adalora", device=device,
                          autocast=autocast)
    return stepper, peft, dtype


def step(key: str, stepper, batch: dict) -> None:
    """One step on the global ``batch``: rankopt shards it itself, a DDP-wrapped PEFT model gets its shard."""
    from rankopt import distributed

    stepper.step(batch if key in ("adaptive", "adaptive-prune", "fixed") else distributed.shard(batch))


def make_batches(n: int, vocab: int, batch: int, seq: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}.items()})
    return out


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(args, base, device: str, vocab: int, variant: str, quant_dir: Path) -> dict[str, float]:
    """Peak GiB each run adds on top of the shared base weights, each run alone."""
    out = {}
    batches = make_batches(args.memory_steps, vocab, args.batch, args.seq, device)
    for key in variant_runs(variant, torch.distributed.is_initialized()):
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stepper, model, _ = build_run(args, key, base, args.memory_steps, device, variant, quant_dir)
        for batch in batches:
            step(key, stepper, batch)
        sync(device)
        out[key] = (torch.cuda.max_memory_allocated() - before) / 2**30
        del stepper, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def time_runs(args, base, device: str, vocab: int, variant: str,
              quant_dir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    total = args.steps + args.warmup
    keys = variant_runs(variant, torch.distributed.is_initialized())
    built = {key: build_run(args, key, base, total, device, variant, quant_dir) for key in keys}
    dtypes = {key: str(b[2]).removeprefix("torch.") for key, b in built.items()}
    times: dict[str, list[float]] = {key: [] for key in keys}
    for i, batch in enumerate(make_batches(total, vocab, args.batch, args.seq, device)):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate who goes first
            sync(device)
            t0 = time.perf_counter()
            step(key, built[key][0], batch)
            sync(device)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    del built
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    timing = {key: {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts)} for key, ts in times.items()}
    return timing, dtypes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:K, or cpu (with --tiny, for a smoke run)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 decoder instead of the 1.1B one")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--memory-steps", type=int, default=20, help="steps per memory run (0: skip; CUDA only)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="plain, ckpt (gradient checkpointing), 4bit (nf4 base via bitsandbytes)")
    ap.add_argument("--nproc-per-node", type=int, default=1,
                    help="data-parallel processes, one GPU each; --batch stays the global batch")
    args = ap.parse_args()
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:  # start the N processes, then report their outcome
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.nproc_per_node}", "--max-restarts=0", *sys.argv]
        sys.exit(subprocess.run(command).returncode)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch here; the GPU benchmark (issue 13) was not run. "
              "For a CPU smoke run: --tiny --device cpu", file=sys.stderr)
        sys.exit(2)
    if not cuda and not args.tiny:
        print("error: the 1.1B model is for a GPU; on the CPU pass --tiny", file=sys.stderr)
        sys.exit(2)
    if args.steps + args.warmup < 2 or args.memory_steps == 1:
        ap.error("runs need at least 2 steps (AdaLoRA fixes its budget at its last step)")
    from rankopt import distributed

    procs = distributed.init_from_environment(args.device)
    if procs.parallel:
        distributed.check_divisible(args.batch, "--batch")
        args.device = f"cuda:{procs.local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(torch.device(args.device))
    if "4bit" in args.variants and not importable("bitsandbytes"):
        args.variants = [v for v in args.variants if v != "4bit"]
        if not args.variants:
            print("error: the 4bit variant needs bitsandbytes (pip install 'rankopt[quant]'), which is not "
                  "installed here; pass --variants plain ckpt", file=sys.stderr)
            sys.exit(2)
        skipped = "; 4bit skipped: bitsandbytes is not installed"
        if procs.main:
            print("note: bitsandbytes is not installed: the 4bit variant is skipped "
                  "(pip install 'rankopt[quant]' to run it)", file=sys.stderr)
    else:
        skipped = ""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = build_base(args, args.device, dtype)
    vocab = base.config.vocab_size
    n_params = sum(p.numel() for p in base.parameters())
    names = {k: v.format(r=args.rank, half=args.rank // 2, init=adalora_init(args.rank)) for k, v in RUNS.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            quant_dir = Path(tmp) / "base"
            memory = measure_memory(args, base, args.device, vocab, variant, quant_dir) \
                if cuda and args.memory_steps > 0 else {}
            timing, dtypes = time_runs(args, base, args.device, vocab, variant, quant_dir)
            for key, t in timing.items():
                row = {"variant": variant, "run": names[key], "adapter_dtype": dtypes[key], **t,
                       "median_ratio": t["median_s"] / timing["lora"]["median_s"],
                       "mean_ratio": t["mean_s"] / timing["lora"]["mean_s"]}
                if key in memory:
                    row.update(peak_gib=memory[key], peak_ratio=memory[key] / memory["lora"])
                rows.append(row)
    distributed.shutdown()
    if not procs.main:
        return
    device_name = torch.cuda.get_device_name(args.device) if cuda else (platform.processor() or platform.machine())
    where = f"{procs.world} data-parallel processes (rank 0's figures), global " if procs.parallel else ""
    import rankopt

    print(f"# GPU overhead: random Llama-shaped decoder, {n_params / 1e9:.2f}B params, {args.dtype}, {where}batch "
          f"{args.batch} x seq {args.seq}, rank {args.rank} on {len(TARGETS)} projections per layer, {args.steps} "
          f"timed steps (+{args.warmup}) interleaved per variant; {device_name}, torch {torch.__version__}; "
          f"rankopt from {Path(rankopt.__file__).parent}{skipped}")
    print("| variant | run | adapter dtype | median step (s) | mean step (s) | median / LoRA | mean / LoRA | "
          "peak (GiB) | peak / LoRA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.2f} | {r['peak_ratio']:.3f}" if "peak_gib" in r else "— | —"
        print(f"| {r['variant']} | {r['run']} | {r['adapter_dtype']} | {r['median_s']:.4f} | {r['mean_s']:.4f} | "
              f"{r['median_ratio']:.3f} | {r['mean_ratio']:.3f} | {peak} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
