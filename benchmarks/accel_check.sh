#!/usr/bin/env bash
# One command for the first machine with a GPU or TPU: the Pallas kernel equality tests COMPILED for the device
# (not interpret mode) plus the XLA-path tests on it, then the decode benchmark (packed formats vs dense bfloat16,
# one process per configuration), summarized in one table (benchmarks/accel_table.py).
#
#   bash benchmarks/accel_check.sh                 # from anywhere; uses the repository's .venv when it exists
#   PYTHON=/opt/venv/bin/python BLOCKS=2 bash benchmarks/accel_check.sh
#
# Environment: PYTHON (default: .venv/bin/python when present, else python3), BLOCKS (LLaDA-8B-shaped blocks in
# the decode benchmark, default 4), TINY_CHECKPOINT (the tiny model's quantized checkpoint, default
# runs/tiny/checkpoint; the tiny part is skipped when it is absent), OUT (directory for the logs and JSON, default
# a fresh temporary one).
# Exit status: 0 when every check passed, or when the machine has no accelerator at all; 1 when a check failed,
# when PYTHON cannot import jax, or when the machine has a GPU (nvidia-smi lists one) or a TPU (/dev/accel*, or a
# Google PCI device) but JAX runs on the CPU (install jax[cuda12] or jax[tpu] into PYTHON's environment).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=".venv/bin/python"
else PY="python3"
fi
BLOCKS="${BLOCKS:-4}"
TINY="${TINY_CHECKPOINT:-runs/tiny/checkpoint}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
# An empty JAX_PLATFORMS lets JAX pick the accelerator (tests/conftest.py only fills it in when it is unset).
export JAX_PLATFORMS=""
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PY" -c 'import jax' > "$OUT/import.log" 2>&1; then
  echo "accel_check: '$PY' cannot import jax ($(tail -n 1 "$OUT/import.log")); set PYTHON=path/to/python of the" \
       "environment the project is installed in (e.g. PYTHON=.venv/bin/python)" >&2
  exit 1
fi
BACKEND="$("$PY" -c 'import jax; print(jax.default_backend())' 2> "$OUT/backend.log")"
HAS_GPU=0; HAS_TPU=0
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then HAS_GPU=1; fi
if compgen -G "/dev/accel*" > /dev/null || { command -v lspci > /dev/null 2>&1 && [ -n "$(lspci -d 1ae0: 2> /dev/null)" ]; }
then HAS_TPU=1; fi
case "$BACKEND" in
  gpu|cuda|rocm) KERNEL_TESTS="tests/kernels/test_pallas_gpu.py"; KPATH="pallas_gpu" ;;
  tpu) KERNEL_TESTS="tests/kernels/test_pallas_tpu.py"; KPATH="pallas_tpu" ;;
  *) if [ "$HAS_GPU" -eq 1 ]; then
       echo "accel_check: this machine has a GPU (nvidia-smi -L lists one) but JAX in '$PY' runs on" \
            "'${BACKEND:-?}' (a CPU-only jaxlib, or CUDA failed to initialize: $OUT/backend.log); install" \
            "'jax[cuda12]' into that environment (pip install -U 'jax[cuda12]') or set PYTHON=... to one that has it" >&2
       exit 1
     fi
     if [ "$HAS_TPU" -eq 1 ]; then
       echo "accel_check: this machine has a TPU (/dev/accel* or a Google PCI device) but JAX in '$PY' runs on" \
            "'${BACKEND:-?}' (see $OUT/backend.log; is another process holding the TPU?); install 'jax[tpu]'" \
            "into that environment (pip install -U 'jax[tpu]') or set PYTHON=... to one that has it" >&2
       exit 1
     fi
     echo "accel_check: no accelerator is present (JAX backend: ${BACKEND:-unavailable}); nothing to check."
     echo "Run it on a machine with a GPU or TPU (and jax[cuda12] or jax[tpu] installed)."
     exit 0 ;;
esac
echo "accel_check: backend $BACKEND ($("$PY" -c 'import jax; print(jax.devices()[0].device_kind)')), python $PY," \
     "logs in $OUT"

# 1. Kernel equality against float64 NumPy references, compiled for the device.
QDLLM_KERNELS_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider "$KERNEL_TESTS" --junitxml="$OUT/pallas.xml" \
  > "$OUT/pallas.log" 2>&1
PALLAS_RC=$?
"$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_xla.py tests/kernels/test_reference.py \
  --junitxml="$OUT/xla.xml" > "$OUT/xla.log" 2>&1
XLA_RC=$?

# 2. Decode: packed formats vs dense bf16 on an LLaDA-8B-shaped stack (and the tiny model when it is built).
PARTS="stack"
[ -f "$TINY/qdllm_checkpoint.json" ] && PARTS="tiny,stack"
"$PY" benchmarks/bench_decode.py --parts "$PARTS" --tiny_checkpoint "$TINY" --blocks "$BLOCKS" --batches 1,8 \
  --prompt 64 --gen 64 --steps 16 --iters 3 --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
DECODE_RC=$?

# 3. One table.
"$PY" benchmarks/accel_table.py "$OUT" "$KPATH" "$PALLAS_RC" "$XLA_RC" "$DECODE_RC"
[ "$PALLAS_RC" -eq 0 ] && [ "$XLA_RC" -eq 0 ] && [ "$DECODE_RC" -eq 0 ]
