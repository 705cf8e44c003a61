"""RTN: uniform min/max round-to-nearest per group, the data-free baseline (H is not used)."""
from __future__ import annotations

from qdllm_jax.quant import packed
from qdllm_jax.quant.method_spec import COMMON_OPTIONS, QuantMethod, is_int
from qdllm_jax.quant.rtn import rtn_quantize


def check_uniform_shape(bits, group_size, n_in, method: str) -> tuple[str, str] | None:
  """bits 2..8; group_size -1 (per channel) or a positive divisor of in_features (RTN and GPTQ)."""
  if not is_int(bits) or not 2 <= bits <= 8:
    return "bits", f"an integer in 2..8 for {method}"
  if not is_int(group_size) or not (group_size == -1 or group_size > 0):
    return "group_size", "a positive group size or -1 (one group per row)"
  if n_in is not None and group_size != -1 and n_in % group_size:
    return "group_size", f"a divisor of in_features={n_in} or -1 (per channel); {group_size} does not divide {n_in}"
  return None


def uniform_bytes(rows: int, cols: int, bits: int, group_size: int, opt: dict) -> int:
  """Exact bytes of a packed uniform weight (quant/packed.py `uniform_nbytes`)."""
  return packed.uniform_nbytes(rows, cols, bits, group_size, opt["scale_dtype"], bool(opt.get("sym", False)),
                               bool(opt.get("act_order", False)))


def solve(ws, h, bits, group_size, abmp_ratio, opt):
  """[(QuantizedWeight, w_hat float32 [out, in], info)] for each matrix of `ws` (h and abmp_ratio unused)."""
  del h, abmp_ratio
  out = []
  for w in ws:
    codes, sc, zr, w_hat = rtn_quantize(w, bits=bits, group_size=group_size, sym=opt["sym"],
                                        scale_dtype=opt["scale_dtype"])
    qw = packed.from_uniform(codes, sc, zr, bits=bits, group_size=group_size, sym=opt["sym"],
                             scale_dtype=opt["scale_dtype"], method="rtn")
    out.append((qw, w_hat, dict(method="rtn")))
  return out


def solve_kernel(w, ph, bits, group_size, opt):
  """rtn_quantize once on w float32 [out, in] (ph unused: RTN has no Hessian factor)."""
  del ph
  return lambda: rtn_quantize(w, bits=bits, group_size=group_size, sym=bool(opt["sym"]),
                              scale_dtype=opt["scale_dtype"])


METHOD = QuantMethod(
    name="rtn",
    summary="uniform min/max round-to-nearest per group (H ignored, may be None); bits 2..8",
    needs_hessian=False,
    options={**COMMON_OPTIONS, "sym": False},
    config_keys=("sym", "scale_dtype"),
    check_shape=lambda bits, g, n_in: check_uniform_shape(bits, g, n_in, "rtn"),
    check_options=lambda opt: None,
    packed_bytes=uniform_bytes,
    solve=solve,
    solve_kernel=solve_kernel,
)
