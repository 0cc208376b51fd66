#!/usr/bin/env bash
# Every GPU check in one run (issue 16), for a machine with one CUDA GPU (the 2-GPU NCCL test skips there):
#   1. the `gpu`-marked tests (tests/gpu: graphs == eager bit for bit, bf16 ~ fp32, grouped SDPA ==
#      repeat_kv on a fused kernel, no host sync per image token, compile close to eager, flash kvcache ==
#      grouped SDPA in bf16) on the mid preset, the streamed weight sync's device peak, NCCL bucket
#      broadcast, a colocated pair on one GPU (gloo and CUDA IPC);
#   2. the CUDA table of bench/sampling.py at the full 14B architecture (random bf16 weights);
#   3. with --variants (a second device call, so each call fits the device tool's 600 s per command):
#      its --variants table instead: the graphed loop against graphs + torch.compile and + flash attention.
# Writes bench/results/gpu_env.md, gpu_tests.md and gpu_sampling.md, or with --variants gpu_variants.md
# (copied to $OUT when set).
# Estimated on one H100: 4-6 min for 1-2 (tests ~1.5 min; table ~3 min, dominated by the eager reference
# loop: 1024 tokens x ~(15-30 ms backbone + 60-150 ms launch-bound eager head)), hard limits 200 s + 360 s;
# 3-4 min for --variants (mostly compiling the 48-layer decode step), hard limit 300 s.
#
#   bash bench/gpu_checks.sh [--preset full] [--in-flight 64] [--device-size 512]
#   bash bench/gpu_checks.sh --variants [same options]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=bench/results
mkdir -p "$RESULTS"
status=0
part=core
if [ "${1:-}" = "--variants" ]; then
  part=variants
  shift
fi

{
  echo "# GPU environment"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  python -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
  echo '```'
} > "$RESULTS/gpu_env.md" 2>&1
cat "$RESULTS/gpu_env.md"

if [ "$part" = core ]; then
# 1. gpu-marked tests (mid preset: seconds each; the limit is generous)
start=$(date +%s)
timeout 200 python -m pytest -q -m gpu tests/gpu tests/alignment/test_stream_weights.py tests/alignment/test_weight_sync.py \
  tests/jobs/test_grpo_colocated.py tests/alignment/test_weight_ipc.py tests/jobs/test_grpo_ipc.py -p no:randomly -p no:cacheprovider -rA 2>&1 | tail -40 \
  > "$RESULTS/gpu_tests.log"
rc=${PIPESTATUS[0]}
{
  echo "# gpu-marked tests: exit $rc in $(( $(date +%s) - start )) s"
  echo
  echo '```'
  cat "$RESULTS/gpu_tests.log"
  echo '```'
} > "$RESULTS/gpu_tests.md"
rm -f "$RESULTS/gpu_tests.log"
cat "$RESULTS/gpu_tests.md"
[ "$rc" -eq 0 ] || status=1

# 2. the CUDA benchmark table (14B: ~20 s to build, 1.5-3 min eager reference loop, ~30 s graphs, 64 in flight)
start=$(date +%s)
timeout 360 python bench/sampling.py --device cuda --out "$RESULTS/gpu_sampling.md" "$@" 2>&1 | tail -30
rc=${PIPESTATUS[0]}
echo "bench/sampling.py --device cuda: exit $rc in $(( $(date +%s) - start )) s"
[ "$rc" -eq 0 ] || status=1

fi

if [ "$part" = variants ]; then
# 3. graphs vs graphs + compile / flash (14B: each compiled runner pays a compile of the 48-layer decode step
#    and the head net, estimated 1-2 min on 16 cores; a variant that fails is a row saying why)
start=$(date +%s)
timeout 300 python bench/sampling.py --device cuda --variants --out "$RESULTS/gpu_variants.md" "$@" 2>&1 | tail -20
rc=${PIPESTATUS[0]}
echo "bench/sampling.py --device cuda --variants: exit $rc in $(( $(date +%s) - start )) s"
[ "$rc" -eq 0 ] || status=1

fi

if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/gpu_*.md "$OUT"/ 2>/dev/null
fi
exit $status
