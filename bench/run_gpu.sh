#!/usr/bin/env bash
# The GPU checks of issue 4 in one go (run from the repository root on a CUDA machine; results to $OUT or
# bench/results/): the Triton kernel tests on CUDA (fp32, bf16/fp16), the kernel micro-benchmarks, and
# full training steps of ResNet-18-GN / WRN-16-4-GN (batch 256, 32x32) and ResNet-50-GN (batch 64, 224x224)
# in fp32 and bf16 autocast, every provider in the same run.
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" | tee "$out/gpu_versions.txt"
python -m pytest -q tests/test_triton_kernels.py tests/test_per_sample_norms.py 2>&1 | tail -20 | tee "$out/gpu_tests.txt"
python bench/bench_kernels.py --device cuda --out "$out/kernels_cuda.json" | tee "$out/kernels_cuda.txt"
providers="nonprivate dpsat_fast dpsat_fast_sat opacus_ghost opacus_hooks"
for amp in none bf16; do
  python bench/throughput.py --device cuda --models resnet18_gn wrn16_4_gn --batch-sizes 256 --providers $providers \
    --amp $amp --out "$out/throughput_cuda_32px_$amp.json"
  python bench/throughput.py --device cuda --models resnet50_gn --batch-sizes 64 --providers $providers \
    --amp $amp --out "$out/throughput_cuda_resnet50_$amp.json"
done
