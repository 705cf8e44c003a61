"""The Pallas kernels lower for their accelerators (Mosaic TPU / Triton GPU) without one: `jax.export` runs the
Pallas lowering to Mosaic / Triton IR on CPU, which rejects unsupported ops, shapes and block specs. (The final
Mosaic / Triton compilation needs the device and is not covered here.)"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from qdllm_jax.kernels import qmatmul


def _weights(planes, uniform):
  return {"planes": planes(256, 1024, [2, 1, 3, 2, 2, 2, 3, 1])[0], "int2": uniform(256, 1024, 2, 128)[0],
          "int3": uniform(256, 1024, 3, 128)[0], "int3_act": uniform(256, 1024, 3, 128, act_order=True)[0]}


@pytest.mark.parametrize("platform,path", [("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")])
def test_kernels_lower(planes, uniform, platform, path):
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for name, qw in _weights(planes, uniform).items():
    for n, dtype in ((1, jnp.bfloat16), (300, jnp.float32)):
      x = jax.ShapeDtypeStruct((n, 1024), dtype)
      exp = export.export(jax.jit(lambda x, q: qmatmul(x, q, path=path)), platforms=[platform],
                          disabled_checks=checks)(x, qw)
      text = exp.mlir_module()
      assert ("tpu_custom_call" in text) if platform == "tpu" else ("xla.gpu.triton" in text), name


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_xla_path_dots_are_full_float32_precision_for_float32(planes, uniform, platform):
  """Every dot of the XLA path, exported for a GPU / TPU, asks for HIGHEST precision when the activations are
  float32 (JAX's DEFAULT lets a GPU use TF32 and a TPU bfloat16 passes: ~1e-3 relative error), in both regimes and
  both formats (uniform aligned: the GEMV; act-order: dequantize + dot); the prefill dot keeps DEFAULT for bfloat16."""
  weights = {"planes": planes(72, 256, [1, 3])[0], "int4": uniform(72, 256, 4, 64)[0],
             "int4_act": uniform(72, 256, 4, 64, act_order=True)[0]}
  for name, qw in weights.items():
    for n, dtype in ((1, jnp.float32), (16, jnp.float32), (16, jnp.bfloat16)):
      exp = export.export(jax.jit(lambda x, q: qmatmul(x, q, path="xla")), platforms=[platform])(
          jax.ShapeDtypeStruct((n, 256), dtype), qw)
      text = exp.mlir_module()
      dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
      assert dots, name
      if dtype == jnp.float32:
        assert all("precision = [HIGHEST, HIGHEST]" in ln for ln in dots), (name, n, dots)
      else:  # DEFAULT is printed as no precision attribute
        assert all("precision" not in ln for ln in dots), (name, n, dots)
