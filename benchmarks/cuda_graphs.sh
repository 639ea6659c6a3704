#!/usr/bin/env bash
# The prepared run for a lent GPU (issue: DP steps at plain speed on CUDA). Run from the repository root on the
# GPU machine, with psgrad importable (PYTHONPATH=src) and results written to OUT (default: results/cuda):
#   bash benchmarks/cuda_graphs.sh "$OUT"
# 1. the tests marked cuda (a real capture against the float64 truth among them);
# 2. the seed workload and two transformer workloads at batch 128: plain eager and captured, hooks eager and
#    captured (grads fresh and out=, clipped sums), TF32 off; one JSON and one markdown table per task.
# About 6 minutes on an H100 when every row runs; each step is bounded by the bench's own --timeout.
set -u
out=${1:-results/cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
python -m pytest -q -p no:cacheprovider -m cuda tests/test_graphed.py tests/test_api.py tests/test_verify.py \
    2>&1 | tail -15 | tee "$out/cuda-tests.txt"
workloads=resnet18-gn,transformer,gpt2-tiny
for task in grads clipped; do
    python -m psgrad bench --device cuda --cuda-graphs --task "$task" --workloads "$workloads" \
        --batch-sizes 128 --engines hooks,opacus-dp --repeats 7 --timeout 240 \
        --json "$out/cuda-graph-$task.json" --markdown "$out/cuda-graph-$task.md"
done
