#!/usr/bin/env bash
# One-GPU check of issue 18 (under 8 minutes on one H100): the Triton tangent kernel compiled for
# real, attention JVP fused against math at L = 1024 and 4096, and the step cost of a DiT-B/2 over
# 32x32x4 latents in bf16: eager flow / sCT traced / sCT torch.func.jvp (separate), then compiled; last,
# sCD students of diffusers UNets with attention trained on CUDA (needs diffusers).
# Run from the repository root:  bash benchmarks/gpu_check.sh  (results in benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== 1. Triton kernel and the traced graph on CUDA (tests) =="
timeout 150 python -m pytest -q tests/test_traced_jvp.py tests/test_tangent.py tests/test_attention_jvp.py \
    -k cuda -p no:cacheprovider

echo "== 2. attention JVP: fused (triton) against math and torch.func.jvp, bf16, 8 heads, d 64 =="
timeout 90 python benchmarks/attention_jvp.py --device cuda --lengths 1024 4096 --batch 4 --heads 8 \
    --head-dim 64 --dtype bf16 --out "$out/attention_jvp-h100.json"

dit=(--device cuda --net dit --img-channels 4 --resolution 32 --channels 192 --depth 12 --heads 12
     --batch 64 --amp bf16 --repeats 10 --warmup 3)
echo "== 3. step cost, DiT-B/2 on 32x32x4 latents, bf16, eager (peak memory per mode) =="
timeout 150 python benchmarks/step_cost.py "${dit[@]}" --modes flow sct-traced sct-tangent sct-separate \
    --out "$out/step_cost-ditb2-eager-h100.json"
echo "== 4. the same, compiled (flow step, and sCT's traced joint graph) =="
timeout 210 python benchmarks/step_cost.py "${dit[@]}" --modes flow sct-traced --compile --no-memory \
    --out "$out/step_cost-ditb2-compiled-h100.json"
echo "== 5. sCD students of diffusers teachers on CUDA (attention's backward through the traced graph) =="
timeout 120 python benchmarks/diffusers_students.py --out "${TMPDIR:-/tmp}/fewstep-students-cuda" --quick --device cuda \
    --teachers flow,epsilon
