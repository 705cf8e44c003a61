"""Packed low-bit matmul: y = x @ W^T from a `QuantizedWeight` without materializing W^ (docs/packed_format.md).

`qmatmul(x, qw, path=None)` dispatches by backend: TPU -> Pallas/Mosaic kernel (`pallas_tpu`), GPU -> Pallas/
Triton kernel (`pallas_gpu`), anything else -> the portable jnp path (`xla`). `path` forces one of
  "xla", "pallas_tpu", "pallas_gpu",
  "interpret" (= "pallas_tpu_interpret"), "pallas_tpu_interpret", "pallas_gpu_interpret"
(the last three run the Pallas kernels in interpret mode, which works on CPU). It is jit-compatible: the weight
is a pytree whose layout facts (shape, format, bits, group_size, sym) are static.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qdllm_jax.errors import ConfigError, FormatError
from qdllm_jax.kernels import pallas_gpu, pallas_tpu, xla

PATHS = ("xla", "pallas_tpu", "pallas_gpu", "interpret", "pallas_tpu_interpret", "pallas_gpu_interpret")


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def kernel_supports(qw, path: str) -> str | None:
  """None if `path` can run `qw`, else the reason (block-size limits of the Pallas kernels)."""
  if qw.format != "binary_planes":
    return None
  bs = qw.group_size
  if path.startswith("pallas_tpu") or path == "interpret":
    return None if bs % 128 == 0 else f"the TPU kernel needs block size % 128 == 0, got {bs}"
  if path.startswith("pallas_gpu"):
    return None if _pow2(bs) and bs >= 32 else f"the GPU kernel needs a power-of-two block size, got {bs}"
  return None


def default_path(qw=None) -> str:
  """Path used when none is forced: by `jax.default_backend()`, falling back to "xla" if unsupported."""
  backend = jax.default_backend()
  path = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(backend, "xla")
  if qw is not None and kernel_supports(qw, path) is not None:
    return "xla"
  return path


def _check(x, qw, path):
  if not hasattr(qw, "format") or not hasattr(qw, "dequantize"):
    raise FormatError(f"qmatmul expects a QuantizedWeight, got {type(qw).__name__}. Dense weights go through "
                      f"models.layers.linear's einsum path.")
  qw.validate()
  if x.ndim < 1 or x.shape[-1] != qw.shape[1]:
    raise FormatError(f"qmatmul: x has shape {tuple(x.shape)} but the weight is [out, in] = {tuple(qw.shape)}; "
                      f"the last dim of x must equal in={qw.shape[1]}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise FormatError(f"qmatmul: x dtype {x.dtype} is not floating; pass float32 or bfloat16 activations.")
  if path is not None:
    if path not in PATHS:
      raise ConfigError(f"qmatmul path {path!r} is unknown; expected None or one of {PATHS}.")
    why = kernel_supports(qw, path)
    if why is not None:
      raise ConfigError(f"qmatmul path {path!r} cannot run this weight: {why}. Use path='xla' or None.")


def qmatmul(x: jax.Array, qw, *, path: str | None = None) -> jax.Array:
  """y[..., o] = sum_i x[..., i] W^[o, i] for a packed weight, never building W^ [out, in] in HBM.

  Args:
    x: [..., in] float32 or bfloat16 activations.
    qw: `qdllm_jax.quant.packed.QuantizedWeight` ("binary_planes" or "uniform").
    path: None (by backend) or one of PATHS.
  Returns:
    [..., out] in x's dtype; products accumulated in float32.
  """
  _check(x, qw, path)
  path = default_path(qw) if path is None else path
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if x2.shape[0] == 0:
    return jnp.zeros(lead + (qw.shape[0],), x.dtype)
  if path == "xla":
    y = xla.matmul(x2, qw)
  elif path == "pallas_tpu":
    y = pallas_tpu.matmul(x2, qw)
  elif path in ("interpret", "pallas_tpu_interpret"):
    y = pallas_tpu.matmul(x2, qw, interpret=True)
  elif path == "pallas_gpu":
    y = pallas_gpu.matmul(x2, qw)
  else:
    y = pallas_gpu.matmul(x2, qw, interpret=True)
  return y.astype(x.dtype).reshape(lead + (qw.shape[0],))


__all__ = ["qmatmul", "default_path", "kernel_supports", "PATHS"]
