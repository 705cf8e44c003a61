#!/usr/bin/env bash
# One command for the first machine with a GPU or TPU: the Pallas kernel equality tests COMPILED for the device
# (not interpret mode) plus the XLA-path tests on it, then the decode benchmark (packed formats vs dense bfloat16),
# summarized in one table. On a machine without an accelerator it says so and exits 0.
#
#   bash benchmarks/accel_check.sh                 # from the repository root, with the project installed
#   PYTHON=.venv/bin/python BLOCKS=4 bash benchmarks/accel_check.sh
#
# Environment: PYTHON (default: python3), BLOCKS (LLaDA-8B-shaped blocks in the decode benchmark, default 2),
# TINY_CHECKPOINT (the tiny model's quantized checkpoint, default runs/tiny/checkpoint; the tiny part is skipped
# when it is absent), OUT (directory for the logs and JSON, default a fresh temporary one).
# Exit status: 0 when every kernel test passed (or no accelerator is present), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BLOCKS="${BLOCKS:-2}"
TINY="${TINY_CHECKPOINT:-runs/tiny/checkpoint}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
# An empty JAX_PLATFORMS lets JAX pick the accelerator (tests/conftest.py only fills it in when it is unset).
export JAX_PLATFORMS=""
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

BACKEND="$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)"
case "$BACKEND" in
  gpu|cuda|rocm) KERNEL_TESTS="tests/kernels/test_pallas_gpu.py"; KPATH="pallas_gpu" ;;
  tpu) KERNEL_TESTS="tests/kernels/test_pallas_tpu.py"; KPATH="pallas_tpu" ;;
  *) echo "accel_check: no accelerator is present (JAX backend: ${BACKEND:-unavailable}); nothing to check."
     echo "Run it on a machine with a GPU or TPU (and jax[cuda] or jax[tpu] installed)."
     exit 0 ;;
esac
echo "accel_check: backend $BACKEND ($("$PY" -c 'import jax; print(jax.devices()[0].device_kind)')), logs in $OUT"

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
"$PY" - "$OUT" "$KPATH" "$PALLAS_RC" "$XLA_RC" "$DECODE_RC" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, kpath, rcs = sys.argv[1], sys.argv[2], [int(v) for v in sys.argv[3:]]

def junit(name):
  path = os.path.join(out, name)
  if not os.path.isfile(path):
    return "did not run (see the log)", []
  suite = ET.parse(path).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  cases = suite.findall("testcase")
  bad = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
  skipped = sum(c.find("skipped") is not None for c in cases)
  return (f"{len(cases) - len(bad) - skipped} passed, {len(bad)} failed, {skipped} skipped "
          f"({float(suite.get('time', 0)):.1f} s)"), bad

rows = [("kernel tests, " + kpath + " compiled", *junit("pallas.xml")),
        ("kernel tests, xla path on the device", *junit("xla.xml"))]
print(f"\n{'check':44s} result")
for name, res, bad in rows:
  print(f"{name:44s} {res}" + (f"  FAILED: {', '.join(bad[:6])}" if bad else ""))
dec = os.path.join(out, "decode.json")
if rcs[2] == 0 and os.path.isfile(dec):
  data = json.load(open(dec))
  for r in data["rows"]:
    ratio = "" if r["speedup_vs_base"] is None else f"  x{r['speedup_vs_base']:.2f} vs dense"
    print(f"{'decode ' + r['part'] + ' ' + r['weights'] + ' batch ' + str(r['batch']):44s} "
          f"{r['tokens_per_s']:9.1f} tokens/s  {r['step_ms']:8.2f} ms/step  {r['weight_mb_per_token']:8.2f} MB "
          f"weights/token  {r['xla_peak_mib']:8.1f} MiB peak{ratio}")
else:
  print(f"{'decode benchmark':44s} failed (exit {rcs[2]}); see {os.path.join(out, 'decode.log')}")
print(f"\nlogs: {out}/pallas.log, xla.log, decode.log")
EOF
[ "$PALLAS_RC" -eq 0 ] && [ "$XLA_RC" -eq 0 ] && [ "$DECODE_RC" -eq 0 ]
