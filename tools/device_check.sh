#!/usr/bin/env bash
# Everything the GPU machine checks, in one call: build, the whole test suite with CUDA,
# then (optional stages) the sanitizers and the benchmarks. Logs go to $OUT (or ./device-logs).
#   bash tools/device_check.sh [stage ...]
# stages: env build test gpu sanitize crash probe bench block models (default: env build test)
# The first GPU minute (issue 12), one call under 10 minutes:
#   bash tools/device_check.sh env build gpu sanitize
# gpu: the tests only a GPU runs (tests/test_gpu.py: over 2^31 elements, CUDA graphs, a
# side stream, misaligned views) and the CUDA cases of autocast and torch.compile with
# dynamic shapes (native and Triton); sanitize: compute-sanitizer memcheck and racecheck
# over every kernel (tools/sanitize_kernels.py), without the caching allocator.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FUSEDACT_CUDA=1 FUSEDACT_EXPECT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
# The device machine has torch 2.11, older than the floor CI tests (setup.py): build there anyway.
export FUSEDACT_ALLOW_UNTESTED_TORCH=1
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
stages=${*:-env build test}
for s in $stages; do
  echo "=== $s $(date -u +%FT%TZ)"
  case $s in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/env.txt"
      $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt" ;;
    build)
      $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
      $PY -c "import fusedact; print(fusedact.build_info())" ;;
    test)
      $PY -m pytest -q -n 12 -p no:cacheprovider -W ignore::RuntimeWarning tests 2>&1 | tee "$OUT/test.log" | tail -60 ;;
    gpu)
      $PY -m pytest -q -p no:cacheprovider -W ignore::RuntimeWarning tests/test_gpu.py 2>&1 | tee "$OUT/gpu.log" | tail -30
      $PY -m pytest -q -n 8 -p no:cacheprovider -W ignore::RuntimeWarning -k cuda \
        tests/test_autocast.py tests/test_compile.py 2>&1 | tee -a "$OUT/gpu.log" | tail -30 ;;
    sanitize)
      SAN=${CUDA_HOME}/bin/compute-sanitizer
      for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool $tool --error-exitcode 1 --print-limit 20 \
          $PY tools/sanitize_kernels.py > "$OUT/sanitize-$tool.log" 2>&1
        echo "$tool: exit $? ($(grep -c '========= ' "$OUT/sanitize-$tool.log") sanitizer lines)"; tail -5 "$OUT/sanitize-$tool.log"
      done ;;
    crash)  # where a failing argument check crashed (torch 2.11 there): a backtrace
      cuda-gdb -batch -ex run -ex bt --args $PY -c "import torch, fusedact; x = torch.randn(2, 3); torch.ops.fusedact.mish_backward(torch.randn(3, 2), x)" 2>&1 | tail -40 | tee "$OUT/crash.log"
      $PY -c "import torch; torch.ops.aten.mish_backward(torch.randn(3, 2), torch.randn(2, 3))" 2>&1 | tail -3 ;;
    probe)
      $PY tools/probe_gpu.py 2>&1 | tee "$OUT/probe.log" ;;
    bench)
      $PY benchmarks/bench.py --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log" | tail -c 9000
      # short NCHW maps (several (n, c) runs a block): acon_c at a backbone's late stages
      $PY benchmarks/bench.py --ops acon_c --sizes --shapes 32x256x14x14 32x512x7x7 64x128x28x28 \
        --providers eager native triton --csv "$OUT/bench-short-maps.csv" 2>&1 | tee "$OUT/bench-short-maps.log" | tail -c 4000
      MPLBACKEND=Agg $PY benchmarks/plot.py "$OUT/bench.csv" --out "$OUT/plots" ;;
    block)  # issue 22 on the GPU: the block's training step, eager / compile / the native CUDA
      # passes (fusedact.config.cuda_bn_passes, off by default until this says they are right
      # and fast), and the fused forward against the bytes-moved bound
      $PY benchmarks/bench.py --block --device cuda --csv "$OUT/block-cuda.csv" 2>&1 | tee "$OUT/block.log" | tail -20 ;;
    models)  # issue 20's table on the GPU: compiled original vs converted under each mode
      # (settles fusedact._inductor.AUTO for CUDA); models whose package is missing are skipped
      $PY benchmarks/models.py --device cuda --rounds 5 --compile-modes auto fuse kernel \
        --csv "$OUT/models-cuda.csv" 2>&1 | tee "$OUT/models.log" | grep -v Warning | tail -40 ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
