"""DuQuant (arXiv 2406.01721) with `--epochs 0` (no learned parameters), as in the dLLM PTQ study.

Per block and tap (qkv, o, gate_up, down), from the FP calibration inputs X [T, C]:
  1. smoothing s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (SmoothQuant's formula, alpha 0.5);
  2. a block-diagonal rotation R1 (blocks of B channels) built greedily on X diag(s)^-1: per block, take
     the channel d with the largest |activation|, and right-multiply R by E_d A E_d, where E_d swaps
     channels 0 and d and A = diag(1, Q') H_B (H_B normalised Hadamard; A's first row is uniform, so channel d is
     spread evenly over its block; Q' a random orthogonal [B-1, B-1]); keep a step only while it lowers
     the block's max |X R|; at most `max_steps` steps;
  3. a zigzag permutation P: channels sorted by max|X R1| (descending) are dealt to blocks 0..n-1, n-1..0,
     0..n-1, ... so outlier mass is balanced across blocks;
  4. a second greedy block rotation R2 on X R1 P.
The online transform of the tap is T = diag(s)^-1 R1 P R2 (applied in the forward by
`weight_activation.forward_actquant(rots=...)`), and each linear reading it becomes W <- W diag(s) R1 P R2, so
X W^T = (X T)(W')^T exactly. Weights: per output channel asymmetric with the range clipped by `w_clip`
(0.8); activations: per token asymmetric with `a_clip` (0.9) in the forward.
Not implemented: quantizing the QK^T and PV matmul inputs (DuQuant does it when activations are quantized).
The transforms are dense [C, C] (the block structure is not exploited in the forward).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.baselines import quarot, smoothquant, weight_activation
from qdllm_jax.baselines.study_method import StudyMethod
from qdllm_jax.errors import QuantizationError
from qdllm_jax.models import layers, transformer


@functools.partial(jax.jit, static_argnames=("block_size", "max_steps"))
def greedy_rotation(x, key, *, block_size: int, max_steps: int = 256):
  """Block-diagonal orthogonal R [C, C] (float32) of step 2 for activations x float [T, C]."""
  t, c = x.shape
  nb, bs = c // block_size, block_size
  h = jnp.asarray(quarot.hadamard_matrix(bs), jnp.float32)
  qr, rr = jnp.linalg.qr(jax.random.normal(key, (bs - 1, bs - 1), jnp.float32))
  qp = jnp.eye(bs, dtype=jnp.float32).at[1:, 1:].set(qr * jnp.sign(jnp.diag(rr))[None, :])
  a = qp @ h  # row 0 = H's first row (uniform): channel 0 is spread evenly
  xb = x.astype(jnp.float32).reshape(t, nb, bs)
  hi = jax.lax.Precision.HIGHEST
  cmax = lambda r: jnp.max(jnp.abs(jnp.einsum("tnb,nbc->tnc", xb, r, precision=hi)), axis=0)  # [nb, B]

  def step(carry, _):
    r, best = carry
    d = jnp.argmax(cmax(r), axis=-1)  # [nb]
    base = jnp.broadcast_to(jnp.arange(bs), (nb, bs))
    perm = jnp.where(base == d[:, None], 0, base).at[:, 0].set(d)  # swap 0 <-> d
    rs = jax.vmap(lambda p: a[p][:, p])(perm)  # E_d A E_d
    new = jnp.einsum("nab,nbc->nac", r, rs, precision=hi)
    nmax = jnp.max(cmax(new), axis=-1)
    ok = nmax < best
    return (jnp.where(ok[:, None, None], new, r), jnp.where(ok, nmax, best)), None

  r0 = jnp.broadcast_to(jnp.eye(bs, dtype=jnp.float32), (nb, bs, bs))
  (r, _), _ = jax.lax.scan(step, (r0, jnp.max(cmax(r0), axis=-1)), None, length=max_steps)
  return jax.scipy.linalg.block_diag(*[r[i] for i in range(nb)])


def zigzag_permutation(cmax, block_size: int) -> np.ndarray:
  """src [C] int: new channel block*B + slot holds old channel order[r], r = slot * n + pos, with
  block = pos on even slots and n-1-pos on odd ones (order: channels by descending max)."""
  cmax = np.asarray(cmax)
  c = cmax.shape[0]
  nb = c // block_size
  order = np.argsort(-cmax, kind="stable")
  src = np.empty(c, np.int64)
  for r, ch in enumerate(order):
    slot, pos = divmod(r, nb)
    blk = pos if slot % 2 == 0 else nb - 1 - pos
    src[blk * block_size + slot] = ch
  return src


def duquant_transform(x, key, *, block_size: int = 128, max_steps: int = 256) -> jax.Array:
  """M = R1 P R2 float32 [C, C] (orthogonal) for smoothed activations x [T, C] (steps 2-4)."""
  c = x.shape[-1]
  if c % block_size or quarot.hadamard_matrix(block_size) is None:
    raise QuantizationError(f"block_size={block_size} must divide the channel count {c} and have a Hadamard "
                            f"matrix (a power of two such as 128).")
  k1, k2 = jax.random.split(key)
  x = x.astype(jnp.float32)
  r1 = greedy_rotation(x, k1, block_size=block_size, max_steps=max_steps)
  x1 = jnp.matmul(x, r1, precision=jax.lax.Precision.HIGHEST)
  src = zigzag_permutation(jnp.max(jnp.abs(x1), axis=0), block_size)
  p = jnp.zeros((c, c), jnp.float32).at[src, np.arange(c)].set(1.0)
  r2 = greedy_rotation(x1[:, src], k2, block_size=block_size, max_steps=max_steps)
  return jnp.matmul(r1 @ p, r2, precision=jax.lax.Precision.HIGHEST)


def duquant(params: dict, cfg, calib_ids, key, *, w_bits: int = 4, alpha: float = 0.5, block_size: int = 128,
            max_steps: int = 256, w_clip: float = 0.8, n_rot_tokens: int = 2048):
  """DuQuant W{w_bits} (module docstring) on calibration windows int [N, L].

  Run with `weight_activation.forward_actquant(qp, cfg, ids, a_bits, a_clip=0.9, rots=rots)`.
  Returns (params with transformed (and, for w_bits < 16, fake-quantized) linears, rots: list per block of
  {tap: T float32 [C, C]}).
  """
  weight_activation.require_prenorm_decoder(
      cfg, "DuQuant",
      "its smoothing and rotations are fused into the pre-norm weights and the RoPE decoder block (arXiv "
      "2406.01721 §3)")
  weight_activation.check_bits(w_bits, "w_bits", allow_none=False)
  if not 0.0 < w_clip <= 1.0:
    raise QuantizationError(f"w_clip={w_clip} must lie in (0, 1] (the study uses 0.8).")
  ids = jnp.asarray(calib_ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise QuantizationError(f"calib_ids must be int [N, L]; got shape {ids.shape}, dtype {ids.dtype}.")
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = layers.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  x = transformer.embed(params, ids)
  blocks, rots = [], []
  for li, p in enumerate(params["blocks"]):
    x_next, taps = transformer.block_forward(p, x, cfg, cos, sin, None, return_taps=True)
    p, tr = dict(p), {}
    for gi, (tap, names) in enumerate(transformer.LINEAR_GROUPS.items()):
      xt = taps[tap].reshape(-1, taps[tap].shape[-1]).astype(jnp.float32)
      s = smoothquant.smooth_scales(jnp.max(jnp.abs(xt), axis=0), [p[n] for n in names], alpha)
      xs = (xt / s[None, :])[::max(1, xt.shape[0] // n_rot_tokens)]
      m = duquant_transform(xs, jax.random.fold_in(key, li * 4 + gi), block_size=block_size,
                            max_steps=max_steps)
      tr[tap] = m / s[:, None]
      for n in names:
        w = jnp.matmul(p[n].astype(jnp.float32) * s[None, :], m, precision=jax.lax.Precision.HIGHEST)
        if w_bits < 16:
          w = weight_activation.fake_quant_per_token(w, w_bits, sym=False, clip=w_clip)
        p[n] = w.astype(p[n].dtype)
    blocks.append(p)
    rots.append(tr)
    x = x_next
  return dict(params, blocks=blocks), rots


def _study_check(settings: dict) -> str | None:
  """The clip ratios of the study's `duquant` section lie in (0, 1]."""
  dq = settings["duquant"]
  if not (0 < dq["a_clip"] <= 1 and 0 < dq["w_clip"] <= 1):
    return f"config.duquant clip ratios a_clip={dq['a_clip']}, w_clip={dq['w_clip']} must be in (0, 1]"
  return None


def _study_build(model, calib_ids, w_bits, a_bits, settings, key):
  """The study's DuQuant W{w_bits}A{a_bits} entry (activations per token, clipped by a_clip)."""
  dq = settings["duquant"]
  qp, rots = duquant(model.params, model.config, calib_ids, key, w_bits=w_bits, alpha=dq["alpha"],
                     block_size=dq["block_size"], max_steps=dq["max_steps"], w_clip=dq["w_clip"])
  return weight_activation.make_model(qp, model.config, a_bits, a_clip=dq["a_clip"], rots=rots)


STUDY_METHOD = StudyMethod(name="duquant", weight_activation=True, sections=("duquant",), build=_study_build,
                           check=_study_check)

__all__ = ["STUDY_METHOD", "greedy_rotation", "zigzag_permutation", "duquant_transform", "duquant"]
