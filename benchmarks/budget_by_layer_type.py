"""Where the final budget goes, by layer type, under a rank budget and a parameter budget.

One run per ``controller.budget_unit`` on one GLUE task with the quality grid's settings (see
``quality_vs_peft.py``), each at the rate given; prints one JSON row per unit: the metric, the
adapter parameters, and the total rank per layer type at step 0 (after the gradient start) and at
the end.

    python benchmarks/budget_by_layer_type.py --task sst2 --lrs 9e-3 3e-3   # the rates each unit picked
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from quality_vs_peft import add_run_arguments, run_config


def by_type(ranks: dict[str, int]) -> dict[str, int]:
    """Sum ranks over the encoder's layers: 'encoder.layer.3.attention.self.query' -> 'attention.self.query'."""
    out: dict[str, int] = collections.defaultdict(int)
    for name, rank in ranks.items():
        out[name.split("layer.", 1)[-1].split(".", 1)[-1]] += rank
    return dict(out)


def main() -> None:
    from rankopt.training.setup import build_model, prepare_data
    from rankopt.training.trainer import train_adapted

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--lrs", nargs=2, type=float, default=[9e-3, 3e-3], help="rate of the rank run, of the params run")
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    add_run_arguments(ap)  # the quality grid's steps, data and device, so its run_config finds all it reads
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for unit, method, lr in zip(("rank", "params"), ("rankopt_rank", "rankopt"), args.lrs):
        cfg = run_config(args.task, args.budget, lr, args.seed, args, method)
        data = prepare_data(cfg)
        result = train_adapted(cfg, build_model(cfg, data.num_labels, label_mean=data.label_mean), data)
        print(json.dumps({"unit": unit, "lr": lr, "metric": result.metrics[cfg.task.metric],
                          "adapter_params": result.adapter_params, "total_rank": result.total_rank,
                          "start": by_type(result.rank_history[0].ranks),
                          "end": by_type(result.rank_history[-1].ranks)}), flush=True)


if __name__ == "__main__":
    main()
