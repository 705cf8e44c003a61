"""Measured durations for the plan: the real kernels timed on this backend and scaled to the model.

What is timed (after one compile, 3 runs each; the range is the fastest to the slowest run):
  factorisation  `prepare_hessian` at each distinct Hessian width c (at most PROBE_CHOL columns; wider ones are
                 scaled by (c / c_probe)^3, the Cholesky's flops); GPTQ factor "cholesky", Quant-dLLM "inverse"
  solver         the method's solver kernel (its `solve_kernel`, quant/method_spec.py) on a [r, c] matrix, plus the
                 diagnostics the pipeline reports for it (layer_errors, scaled by r c^2), at the
                 real shape up to DIRECT_SOLVE weights; larger shapes from two probes [r0, c1] and [r0, c2]
                 (r0 = PROBE_SOLVE): t = r / r0 (a c + b c^2), the per-column loop plus the cross-block update
  calibration    one block forward (plain, and with its taps and the four Hessian updates) at the model's real
                 widths on the run's chunk (at most PROBE_CHUNK_TOKENS tokens, else one sequence of PROBE_TOKENS,
                 scaled by the FLOPs), times chunks x blocks
Durations for hardware other than this backend come only from MEASURED (figures measured there, each with where
it came from); without one the plan says "not measured on this hardware" instead of a number.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.models import families
from qdllm_jax.quant import hessian, methods

PROBE_CHOL = 4096
PROBE_SOLVE = 1024
DIRECT_SOLVE = 4096 * 4096  # solver shapes with at most this many weights (and <= 4096 a side) are timed as they are
PROBE_TOKENS = 256
PROBE_CHUNK_TOKENS = 2048
REPEATS = 3

# Figures measured on named hardware presets (hardware.HARDWARE keys): {name: KernelTimes}. None has been measured on
# a TPU or GPU yet (no accelerator was lent), so the plan prints no duration for any preset.
MEASURED: dict = {}


@dataclasses.dataclass(frozen=True)
class KernelTimes:
  """Measured seconds, each a (fastest, slowest) pair: factor[(kind, width)], solve[(method key, rows, cols)],
  calibration (all blocks' calibration forwards of the run); source says where and how they were measured."""
  factor: dict
  solve: dict
  calibration: tuple
  source: str


def _times(fn) -> tuple[float, float]:
  """(min, max) wall seconds of REPEATS calls of fn after one warm-up (compile) call."""
  jax.block_until_ready(fn())
  ts = []
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return min(ts), max(ts)


def _spd(c: int, seed: int = 0):
  """A well-conditioned random SPD [c, c] float32 Hessian (2/n X^T X of 2c random tokens)."""
  x = np.random.default_rng(seed).standard_normal((2 * c, c)).astype(np.float32)
  return jnp.asarray(x.T @ x / c)


def factor_kind(method: str) -> str | None:
  """The `prepare_hessian` factor a method needs ("cholesky" GPTQ, "inverse" Quant-dLLM, None RTN)."""
  return methods.get_method(method).hessian_factor


def solver_fn(method: str, bits: int, group_size: int, options: dict, rows: int, cols: int):
  """A zero-argument callable running `method`'s solver kernel (its `solve_kernel`) once on a random [rows, cols]
  layer, its Hessian factor (if it has one) prepared from a random SPD H."""
  spec = methods.get_method(method)
  rng = np.random.default_rng(1)
  w = jnp.asarray(0.02 * rng.standard_normal((rows, cols)).astype(np.float32))
  kind = spec.hessian_factor
  ph = None if kind is None else hessian.prepare_hessian(w, _spd(cols), factor=kind)
  return spec.solve_kernel(w, ph, bits, group_size, spec.resolve_options(options))


def _factor_of(ph):
  return ph.u if ph.v is None else ph.v


def _solve_probe_cols(cols: int, group_size: int) -> tuple[int, int]:
  c1 = max(PROBE_SOLVE // 2, group_size)
  return c1, min(2 * c1, cols)


def measure(widths: dict, solves: set, calibration=lambda: (0.0, 0.0)) -> KernelTimes:
  """Time the kernels a run needs on the default backend.

  Args:
    widths: {factor kind: set of Hessian widths}. solves: {(method, bits, group_size, options tuple, rows, cols)}.
    calibration: zero-argument callable timing the calibration forwards ((fastest, slowest) seconds).
  Returns:
    KernelTimes measured now (seconds for the real widths / shapes, scaled where they exceed the probes).
  """
  t_start = time.perf_counter()
  factor = {}
  for kind, ws in widths.items():
    for c in sorted(ws):
      c0 = min(c, PROBE_CHOL)
      h = _spd(c0)
      w1 = jnp.zeros((1, c0), jnp.float32)
      lo, hi = _times(lambda: _factor_of(hessian.prepare_hessian(w1, h, factor=kind)))  # noqa: B023
      s = (c / c0) ** 3
      factor[(kind, c)] = (lo * s, hi * s)
  solve, fits, probes = {}, {}, {}
  for key in sorted(solves, key=str):
    method, bits, g, opts, r, c = key
    o = dict(opts)
    diag = _diagnostics_times(method, r, c, probes)
    if r * c <= DIRECT_SOLVE and max(r, c) <= 4096:
      t = _times(solver_fn(method, bits, g, o, r, c))
      solve[key] = (t[0] + diag[0], t[1] + diag[1])
      continue
    fkey = (method, bits, g, opts)
    if fkey not in fits:  # t(r0, c) = a c + b c^2 from two probes
      c1, c2 = _solve_probe_cols(c, g)
      t1 = _times(solver_fn(method, bits, g, o, PROBE_SOLVE, c1))
      t2 = _times(solver_fn(method, bits, g, o, PROBE_SOLVE, c2)) if c2 > c1 else t1
      fits[fkey] = [_fit(c1, c2, t1[i], t2[i]) for i in (0, 1)]
    solve[key] = tuple(r / PROBE_SOLVE * (a * c + b * c * c) + d for (a, b), d in zip(fits[fkey], diag))
  cal = calibration()
  src = (f"measured on {jax.devices()[0].device_kind} ({jax.default_backend()}) by the planner just now, "
         f"{time.perf_counter() - t_start:.1f} s")
  return KernelTimes(factor, solve, cal, src)


def _diagnostics_times(method: str, r: int, c: int, probes: dict) -> tuple[float, float]:
  """(min, max) s of the per-matrix diagnostics the pipeline reports (hessian.layer_errors: two [r, c] x [c, c]
  products; a method whose solve reports tr(E H E^T) (`reports_layer_loss`, GPTQ) leaves only tr(W H W^T):
  output_energy), timed at
  [min(r, PROBE_CHOL), min(c, PROBE_CHOL)] and scaled by r c^2; `probes` keeps each probe's time for the
  other shapes that share it."""
  r0, c0 = min(r, PROBE_CHOL), min(c, PROBE_CHOL)
  kind = "energy" if methods.get_method(method).reports_layer_loss else "errors"
  if (kind, r0, c0) not in probes:
    w = jnp.asarray(np.random.default_rng(3).standard_normal((r0, c0)).astype(np.float32))
    h = _spd(c0)
    if kind == "energy":
      probes[(kind, r0, c0)] = _times(lambda: hessian.output_energy(w, h))
    else:
      probes[(kind, r0, c0)] = _times(lambda: hessian.layer_errors(w, w * 0.9, h))
  lo, hi = probes[(kind, r0, c0)]
  s = r * c * c / (r0 * c0 * c0)
  return lo * s, hi * s


def _fit(c1: int, c2: int, t1: float, t2: float) -> tuple[float, float]:
  """(a, b) with t = a c + b c^2 through (c1, t1), (c2, t2), both >= 0 (one probe: all per column)."""
  if c2 == c1:
    return t1 / c1, 0.0
  b = (t2 / c2 - t1 / c1) / (c2 - c1)
  b = max(b, 0.0)
  return max((t1 - b * c1 * c1) / c1, 0.0), b


def block_forward_flops(cfg, tokens: int, seqlen: int) -> float:
  """FLOPs of one block forward on `tokens` tokens in sequences of `seqlen` (linears + attention scores)."""
  lin = sum(int(np.prod(s)) for k, s in families.param_shapes(cfg)["blocks"][0].items()
            if k in families.family_of(cfg).linears)
  return 2.0 * lin * tokens + 4.0 * tokens * seqlen * cfg.q_dim


def hessian_flops(cfg, tokens: int) -> float:
  """FLOPs of the four tap Hessian updates (X^T X) on `tokens` tokens."""
  return 2.0 * tokens * (2 * cfg.d_model ** 2 + cfg.q_dim ** 2 + cfg.mlp_hidden ** 2)


def _forward_times(cfg, itemsize: int, batch: int, seqlen: int) -> tuple[tuple, tuple]:
  """((min, max) s of one block forward, (min, max) s of one forward with taps + the 4 tap Hessian updates)
  on [batch, seqlen] tokens at the model's real widths (params of the run's dtype)."""
  dtype = jnp.bfloat16 if itemsize == 2 else jnp.float32
  family = families.family_of(cfg)
  shapes = family.param_shapes(cfg)["blocks"][0]
  p = {k: jnp.full(s, 0.02 if len(s) == 2 else 1.0, dtype) for k, s in shapes.items()}
  x = jnp.asarray(np.random.default_rng(2).standard_normal((batch, seqlen, cfg.d_model)), dtype)
  ctx = family.block_context(cfg, batch, seqlen, None)
  fwd = jax.jit(lambda p, x: family.block_forward(p, x, cfg, ctx))

  @jax.jit
  def capture(p, x):
    y, taps = family.block_forward(p, x, cfg, ctx, return_taps=True)
    hs = [hessian.hessian_update(jnp.zeros((a.shape[-1],) * 2, jnp.float32), 0, a)[0] for a in taps.values()]
    return y, hs

  return _times(lambda: fwd(p, x)), _times(lambda: capture(p, x))


def calibration_probe(nseq: int, seqlen: int, chunk: int) -> tuple[int, int, bool]:
  """(batch, tokens per sequence, exact) of the forward probe: the run's chunk when it has at most
  PROBE_CHUNK_TOKENS tokens (exact), else one sequence of min(seqlen, PROBE_TOKENS) tokens (scaled by FLOPs)."""
  b = min(chunk, nseq)
  if b * seqlen <= PROBE_CHUNK_TOKENS:
    return b, seqlen, True
  return 1, min(seqlen, PROBE_TOKENS), False


def calibration_seconds(cfg, itemsize: int, nseq: int, seqlen: int, chunk: int, passes: int) -> tuple:
  """(fastest, slowest) seconds of the calibration forwards of all blocks: per block and chunk, `passes` - 1
  plain forwards and one with the tap Hessian updates (the run captures one tap per pass; counted together)."""
  b, t, exact = calibration_probe(nseq, seqlen, chunk)
  f, fh = _forward_times(cfg, itemsize, b, t)
  chunks = -(-nseq // min(chunk, nseq))
  per = [(passes - 1) * f[i] + fh[i] for i in (0, 1)]
  if exact:
    scale = chunks * cfg.n_layers
  else:
    run = passes * block_forward_flops(cfg, nseq * seqlen, seqlen) + hessian_flops(cfg, nseq * seqlen)
    probe = passes * block_forward_flops(cfg, b * t, t) + hessian_flops(cfg, b * t)
    scale = cfg.n_layers * run / probe
  return per[0] * scale, per[1] * scale


def workload(cfg, rules_plan):
  """What the solvers of a run do, from shapes: ({factor kind: {width: count}}, {solve key: count}) with
  solve key (method, bits, group_size, options tuple, rows, cols); one factorisation per block and tap whose
  matrices are quantized (matrices reading the same tap share it)."""
  family = families.family_of(cfg)
  lin = {nm: s for nm, s in family.param_shapes(cfg)["blocks"][0].items() if nm in family.linears}
  factors, solves, taps = {}, {}, set()
  for path, rule in rules_plan.modules.items():
    if rule is None:
      continue
    blk, name = rules_plan.names[path]
    r, c = lin[name]
    key = (rule.method, int(rule.bits), int(rule.group_size), tuple(sorted(dict(rule.options).items())), r, c)
    solves[key] = solves.get(key, 0) + 1
    kind = factor_kind(rule.method)
    if kind is not None and (blk, family.tap_of[name], kind) not in taps:
      taps.add((blk, family.tap_of[name], kind))
      factors.setdefault(kind, {})
      factors[kind][c] = factors[kind].get(c, 0) + 1
  return factors, solves


def durations(times: KernelTimes, cfg, rules_plan, split_calib: int = 1, split_solve: int = 1) -> dict:
  """{"calibration", "solvers", "total (without evaluation)": (fastest, slowest) seconds} from measured times.

  split_*: devices sharing the work (chunks over the data axis, solver rows over the model axis).
  """
  factors, solves = workload(cfg, rules_plan)
  sol = [0.0, 0.0]
  for kind, per in factors.items():
    for c, count in per.items():
      for i in (0, 1):
        sol[i] += count * times.factor[(kind, c)][i]
  for key, count in solves.items():
    for i in (0, 1):
      sol[i] += count * times.solve[key][i]
  cal = (times.calibration[0] / split_calib, times.calibration[1] / split_calib)
  sol = (sol[0] / split_solve, sol[1] / split_solve)
  return {"calibration": cal, "solvers": sol, "total (without evaluation)": (cal[0] + sol[0], cal[1] + sol[1])}


def measure_for(cfg, rules_plan, itemsize: int, nseq: int, seqlen: int, chunk: int, passes: int) -> KernelTimes:
  """`measure` of every factorisation width and solver shape the run needs and of its calibration forwards
  (nseq sequences of seqlen tokens in chunks of `chunk`, `passes` forwards per block), on the default backend."""
  factors, solves = workload(cfg, rules_plan)
  return measure({k: set(v) for k, v in factors.items()}, set(solves),
                 lambda: calibration_seconds(cfg, itemsize, nseq, seqlen, chunk, passes))


__all__ = ["KernelTimes", "MEASURED", "measure", "measure_for", "workload", "durations", "solver_fn", "factor_kind",
           "block_forward_flops", "hessian_flops", "calibration_seconds", "calibration_probe"]
