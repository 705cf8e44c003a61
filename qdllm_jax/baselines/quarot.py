"""QuaRot (arXiv 2404.00456) fake-quant path as the dLLM PTQ study runs it
(arXiv 2508.14896, experimental setup; FelixMessi/QDLM scripts).

1. Fold the RMSNorm scales into the following linears: W <- W diag(g) for q/k/v (attn_norm), gate/up
   (ff_norm) and the head (final_norm); the norm weights become 1.
2. Rotate the residual stream by an orthogonal Q [D, D] (random Hadamard H diag(+-1)):
     embed <- embed Q;  W_in <- W_in Q (q, k, v, gate, up, head);  W_out <- Q^T W_out (o, down).
   RMSNorm without a scale commutes with Q (it preserves ||x||), so the FP function is unchanged.
3. V/O per head (fused, exact): v <- blockdiag(H_d)^T v (rows; bias b_v <- b_v blockdiag(H_d)),
   o <- o blockdiag(H_d) (columns).
4. Online Hadamard before the down projection: act <- act R_F in the forward (`rots` = [{"down": R_F}] per
   block), W_down <- W_down R_F.
Then a registered weight method (quant/methods.py; `w_method`: RTN by default, GPTQ in the study's code; one
that needs a Hessian runs block by block on calibration windows) per output channel, symmetric, on every block
linear, and symmetric per-token activations in `weight_activation.forward_actquant(..., a_sym=True, rots=...)`.
Hadamard orders: 2^k (Sylvester) times 1 or q+1 with q a prime = 3 mod 4 (Paley I), e.g. 12288 = 12 * 1024;
other sizes fall back to a random orthogonal matrix (QR of a Gaussian), reported by `rotation`'s flag.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.baselines import weight_activation
from qdllm_jax.baselines.study_method import StudyMethod
from qdllm_jax.errors import ConfigError, QuantizationError
from qdllm_jax.models import act_fake_quant
from qdllm_jax.quant import methods, pipeline, rules
from qdllm_jax.quant.api import quantize_weight

IN_SIDE = ("q", "k", "v", "gate", "up")
OUT_SIDE = ("o", "down")


def _is_prime(q: int) -> bool:
  return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley1(q: int) -> np.ndarray:
  """Unnormalised Hadamard of order q + 1 (q prime, q = 3 mod 4): I + [[0, 1^T], [-1, Jacobsthal Q]]."""
  squares = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)], np.float64)
  jac = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
  s = np.zeros((q + 1, q + 1))
  s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
  return np.eye(q + 1) + s


def hadamard_matrix(n: int) -> np.ndarray | None:
  """Normalised Hadamard H [n, n] float64 (H H^T = I, entries +-1/sqrt(n)), or None when n has no
  decomposition 2^k * m with m = 1 or m - 1 a prime = 3 mod 4."""
  k = 0
  while n % (2 ** (k + 1)) == 0:
    k += 1
  for kk in range(k, -1, -1):
    m = n // 2 ** kk
    if m == 1:
      base = np.ones((1, 1))
    elif m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
      base = _paley1(m - 1)
    else:
      continue
    h = base
    for _ in range(kk):
      h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)
  return None


def rotation(n: int, key: jax.Array, randomize: bool = True) -> tuple[jax.Array, bool]:
  """Orthogonal Q float32 [n, n]: H diag(d), d_i = +-1 random (randomize) or H; a Haar-random orthogonal
  matrix (QR of a Gaussian with sign-fixed R diagonal) where no Hadamard of order n is built.
  Returns (Q, is_hadamard)."""
  h = hadamard_matrix(n)
  if h is None:
    g = np.asarray(jax.random.normal(key, (n, n), jnp.float32), np.float64)
    qm, r = np.linalg.qr(g)
    return jnp.asarray(qm * np.sign(np.diag(r))[None, :], jnp.float32), False
  if randomize:
    d = np.asarray(jax.random.rademacher(key, (n,), jnp.float32), np.float64)
    h = h * d[None, :]
  return jnp.asarray(h, jnp.float32), True


def _mm(a, b):
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def fuse_norms(params: dict, cfg) -> dict:
  """Step 1: W <- W diag(g) for the linears after each RMSNorm; the norm weights become ones."""
  weight_activation.require_prenorm_decoder(
      cfg, "QuaRot",
      "its rotation fusion assumes RMSNorm pre-norm blocks, whose scale-free norm commutes with an orthogonal "
      "rotation of the residual stream (arXiv 2404.00456 §4); LayerNorm mean-centering and biases on a post-LN "
      "residual do not")
  if cfg.tie_embeddings:
    raise ConfigError("QuaRot needs an untied LM head (tie_embeddings=False; LLaDA-8B and Dream-7B are untied); "
                      "got a tied model. Untie it by copying embed into params['head'] and the config first.")
  blocks = []
  for p in params["blocks"]:
    p = dict(p)
    for norm, names in (("attn_norm", ("q", "k", "v")), ("ff_norm", ("gate", "up"))):
      g = p[norm].astype(jnp.float32)
      for n in names:
        p[n] = (p[n].astype(jnp.float32) * g[None, :]).astype(p[n].dtype)
      p[norm] = jnp.ones_like(p[norm])
    blocks.append(p)
  head = (params["head"].astype(jnp.float32) * params["final_norm"].astype(jnp.float32)[None, :])
  return dict(params, blocks=blocks, head=head.astype(params["head"].dtype),
              final_norm=jnp.ones_like(params["final_norm"]))


def _blockdiag(h, reps):
  return jnp.kron(jnp.eye(reps, dtype=jnp.float32), h)


def rotate_params(params: dict, cfg, key: jax.Array, *, rotate_ov: bool = True, online_down: bool = True):
  """Steps 1-4 on an FP params pytree. Returns (rotated params, rots (list of {"down": R_F} per block, or None),
  info {"residual_hadamard": bool, "down_hadamard": bool})."""
  weight_activation.require_prenorm_decoder(
      cfg, "QuaRot",
      "its rotation fusion assumes RMSNorm pre-norm blocks, whose scale-free norm commutes with an orthogonal "
      "rotation of the residual stream (arXiv 2404.00456 §4); LayerNorm mean-centering and biases on a post-LN "
      "residual do not")
  p0 = fuse_norms(params, cfg)
  q, q_had = rotation(cfg.d_model, jax.random.fold_in(key, 0))
  dt = lambda a, like: a.astype(like.dtype)
  out = dict(p0, embed=dt(_mm(p0["embed"], q), p0["embed"]), head=dt(_mm(p0["head"], q), p0["head"]))
  r_f, f_had = (rotation(cfg.mlp_hidden, key, randomize=False) if online_down else (None, False))
  hd = None
  if rotate_ov:
    h, ok = rotation(cfg.head_dim, key, randomize=False)
    if not ok:
      raise QuantizationError(f"head_dim={cfg.head_dim} has no Hadamard matrix for the V/O rotation; pass "
                              f"rotate_ov=False.")
    hd = (_blockdiag(h, cfg.n_kv_heads), _blockdiag(h, cfg.n_heads))
  blocks = []
  for p in p0["blocks"]:
    p = dict(p)
    for n in IN_SIDE:
      p[n] = dt(_mm(p[n], q), p[n])
    for n in OUT_SIDE:
      p[n] = dt(_mm(q.T, p[n]), p[n])
    if hd is not None:
      p["v"] = dt(_mm(hd[0].T, p["v"]), p["v"])
      if p.get("v_bias") is not None:
        p["v_bias"] = dt(_mm(p["v_bias"][None, :], hd[0])[0], p["v_bias"])
      p["o"] = dt(_mm(p["o"], hd[1]), p["o"])
    if r_f is not None:
      p["down"] = dt(_mm(p["down"], r_f), p["down"])
    blocks.append(p)
  out["blocks"] = blocks
  rots = None if r_f is None else [{"down": r_f} for _ in range(cfg.n_layers)]
  return out, rots, {"residual_hadamard": q_had, "down_hadamard": f_had}


def weight_methods() -> tuple[str, ...]:
  """The registered weight methods (quant/methods.py) that can quantize QuaRot's rotated weights: symmetric
  (a `sym` option) per output channel (group_size -1) at every width 2..8."""
  return tuple(name for name, m in methods.REGISTRY.items()
               if "sym" in m.options and all(m.check_shape(b, -1, None) is None for b in range(2, 9)))


def _weight_options(spec, percdamp: float) -> dict:
  """QuaRot's options of a weight method: symmetric, float32 scales, and the damping where it takes one."""
  return {k: v for k, v in dict(sym=True, scale_dtype="float32", percdamp=percdamp).items() if k in spec.options}


def sequential_weights(params: dict, cfg, calib_ids, rots, *, w_bits: int, method: str = "gptq",
                       percdamp: float = 0.01) -> dict:
  """QuaRot's calibrated weight path: a Hessian method (GPTQ), per output channel, symmetric, sequentially on the
  (rotated) FP model, through the package's one block loop (`pipeline.quantize_model`).

  Block by block and group by group (q/k/v, o, gate/up, down), H = (2/N) sum_s X_s^T X_s from the block's
  inputs with the earlier groups already quantized (after the online transforms `rots`, a list of
  {tap: [C, C]} per block or None; QuaRot: down reads act R_F); the next block
  reads the quantized block's outputs. Activations are not quantized during calibration (as QuaRot).
  All N windows go through a block in one pass (as QuaRot's own script), so H is one sum, not a sum of chunks.
  QuaRot's `--w_clip` MSE clipping grid is not implemented (plain min/max GPTQ grid).
  Returns params with every block linear replaced by its fake-quantized weight (same dtypes, no online entries).
  """
  ids = jnp.asarray(calib_ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise QuantizationError(f"calib_ids must be int [N, L]; got shape {ids.shape}, dtype {ids.dtype}.")
  opts = _weight_options(methods.get_method(method), percdamp)
  blocks = [dict(p, **({act_fake_quant.ONLINE: rots[i]} if rots is not None else {}))
            for i, p in enumerate(params["blocks"])]
  plan = rules.default_rules(method, w_bits, -1, **opts)
  qp, _ = pipeline.quantize_model((dict(params, blocks=blocks), cfg), ids, plan, chunk_size=int(ids.shape[0]),
                                  dequantize=True)
  return dict(params, blocks=[{k: v for k, v in b.items() if k != act_fake_quant.ONLINE} for b in qp["blocks"]])


def data_free_weights(params: dict, w_bits: int, *, method: str = "rtn") -> dict:
  """Every block linear of params replaced by its per-output-channel symmetric fake quantization W^ with a weight
  method that needs no Hessian (RTN), float32 scales; same shapes and dtypes."""
  opts = _weight_options(methods.get_method(method), 0.01)
  blocks = []
  for p in params["blocks"]:
    p = dict(p)
    for n in [k for k in p if k != act_fake_quant.ONLINE and getattr(p[k], "ndim", 0) == 2]:
      _, info = quantize_weight(p[n], None, method=method, bits=w_bits, group_size=-1, return_info=True, **opts)
      p[n] = info["w_hat"].astype(p[n].dtype)
    blocks.append(p)
  return dict(params, blocks=blocks)


def quarot(params: dict, cfg, key: jax.Array, *, w_bits: int = 4, rotate: bool = True, rotate_ov: bool = True,
           online_down: bool = True, w_method: str = "rtn", calib_ids=None):
  """QuaRot W{w_bits} (per output channel, symmetric; w_method one of `weight_methods()`, e.g. "rtn", or "gptq"
  on calib_ids) after the rotation.

  Run with `weight_activation.forward_actquant(qp, cfg, ids, a_bits, a_sym=True, rots=rots)`.
  Returns (fake-quantized params, rots or None, info).
  """
  weight_activation.check_bits(w_bits, "w_bits", allow_none=False)
  if w_method not in weight_methods():
    raise QuantizationError(f"w_method={w_method!r} cannot quantize QuaRot's weights; expected one of "
                            f"{weight_methods()} (registered methods with symmetric per-channel grids).")
  spec = methods.get_method(w_method)
  if spec.needs_hessian and calib_ids is None:
    raise QuantizationError(f"w_method={w_method!r} needs calib_ids int [N, L] (WikiText-2 windows in the study).")
  info, rots = {}, None
  if rotate:
    params, rots, info = rotate_params(params, cfg, key, rotate_ov=rotate_ov, online_down=online_down)
  if w_bits >= 16:
    return params, rots, info
  if spec.needs_hessian:
    return sequential_weights(params, cfg, calib_ids, rots, w_bits=w_bits, method=w_method), rots, info
  return data_free_weights(params, w_bits, method=w_method), rots, info


def _study_check(settings: dict) -> str | None:
  """The study's `quarot.w_method` is a weight method QuaRot can use."""
  w = settings["quarot"]["w_method"]
  if w not in weight_methods():
    return f"config.quarot.w_method={w!r}; expected one of {weight_methods()}"
  return None


def _study_build(model, calib_ids, w_bits, a_bits, settings, key):
  """The study's QuaRot W{w_bits}A{a_bits} entry (symmetric per-token activations, the online Hadamards)."""
  q = settings["quarot"]
  qp, rots, _ = quarot(model.params, model.config, key, w_bits=w_bits, rotate_ov=q["rotate_ov"],
                       online_down=q["online_down"], w_method=q["w_method"], calib_ids=calib_ids)
  return weight_activation.make_model(qp, model.config, a_bits, a_sym=True, rots=rots)


STUDY_METHOD = StudyMethod(name="quarot", weight_activation=True, allows_a16=True, sections=("quarot",),
                           build=_study_build, check=_study_check)

__all__ = ["STUDY_METHOD", "hadamard_matrix", "rotation", "fuse_norms", "rotate_params", "weight_methods",
           "sequential_weights", "data_free_weights", "quarot"]
