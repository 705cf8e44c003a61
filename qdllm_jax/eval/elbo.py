"""Masked-diffusion ELBO of a text: an upper bound on -log p(x) in nats ("ELBO perplexity").

For a sequence x with N scored tokens (LLaDA pretraining objective, arXiv 2502.09992):

  -log p(x) <= B(x) = E_{t ~ U(0,1)} E_{M ~ Bernoulli(p_t)^N} [ sum_{i in M} CE_i(x_M) / p_t ],
  p_t = (1 - eps) t + eps,   CE_i(x_M) = -log softmax(model(x with M masked)_i)[x_i].

Estimated with n_mc samples per sequence, stratified (antithetic) in t: t_j = (u0 + j / n_mc) mod 1
with one u0 ~ U[0,1) per sequence; each t_j is marginally U(0,1) so the estimate is unbiased.
B(x) / N is the bound in nats per token and exp(sum_x B(x) / sum_x N) the perplexity bound.
shift=True (Dream): the logits are shifted so position i predicts token i; the first real token
has no prediction and is conditioned on (never masked, not counted in N).

Keys: row b of a call uses key_b = fold_in(key, b); (k_u0, k_mask) = split(key_b);
u0 = uniform(k_u0); position i of sample j is masked iff uniform(fold_in(k_mask, i), [n_mc])[j] <
p_{t_j}. Deterministic given (key, tokens), independent of mc_batch and of right padding. Use a
distinct key per call for a corpus.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError
from qdllm_jax.eval.likelihood import masked_ce
from qdllm_jax.sampling import common


@dataclasses.dataclass(frozen=True)
class ElboResult:
  """Per-sequence results: nll_bound float64 [B] (nats, MC estimate of B(x)), nll_stderr float64
  [B] (iid standard error, conservative for stratified t), n_tokens int64 [B] (scored tokens N)."""
  nll_bound: np.ndarray
  nll_stderr: np.ndarray
  n_tokens: np.ndarray

  @property
  def nats_per_token(self):
    """B(x) / N per sequence, float64 [B]."""
    return self.nll_bound / self.n_tokens

  def perplexity(self):
    """exp(sum B(x) / sum N): the token-weighted ELBO perplexity of these sequences (float)."""
    return float(np.exp(self.nll_bound.sum() / self.n_tokens.sum()))


def elbo_perplexity(results):
  """exp(sum B / sum N) over a list of ElboResult (e.g. one per batch of a corpus)."""
  nll = sum(float(r.nll_bound.sum()) for r in results)
  return float(np.exp(nll / sum(int(r.n_tokens.sum()) for r in results)))


@functools.partial(jax.jit, static_argnames=("mask_id", "n_mc", "mc_batch", "eps", "shift"))
def _elbo_core(model, tokens, scored, attn, keys, *, mask_id, n_mc, mc_batch, eps, shift):
  """Returns (mean, mean of squares) over the n_mc per-sample losses, float32 [B] each."""
  batch, length = tokens.shape
  split = jax.vmap(jax.random.split)(keys)
  k_u0, k_mask = split[:, 0], split[:, 1]
  u0 = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(k_u0)
  targets = jnp.repeat(tokens, mc_batch, axis=0)
  pos = jnp.arange(length, dtype=jnp.uint32)
  draw = lambda k, q: jax.random.uniform(jax.random.fold_in(k, q), (n_mc,), jnp.float32)
  r_all = jax.vmap(lambda k: jax.vmap(lambda q: draw(k, q))(pos))(k_mask)  # [B, L, n_mc]
  am = None if attn is None else jnp.repeat(attn, mc_batch, axis=0)

  def chunk(carry, c):
    j = c * mc_batch + jnp.arange(mc_batch, dtype=jnp.int32)
    t = jnp.mod(u0[:, None] + j[None].astype(jnp.float32) / n_mc, 1.0)
    p = (1 - eps) * t + eps  # [B, mb]
    r = jax.lax.dynamic_slice_in_dim(r_all, c * mc_batch, mc_batch, axis=2).transpose(0, 2, 1)
    m = (r < p[..., None]) & scored[:, None, :]
    rows = jnp.where(m, mask_id, tokens[:, None, :]).reshape(batch * mc_batch, length)
    logits = common.call_model(model, rows, am)
    if shift:
      logits = common.shift_logits(logits)
    ce = masked_ce(logits, targets).reshape(batch, mc_batch, length)
    loss = jnp.sum(jnp.where(m, ce / p[..., None], 0.0), axis=-1)  # [B, mb]
    return (carry[0] + loss.sum(1), carry[1] + (loss * loss).sum(1)), None

  zeros = jnp.zeros((batch,), jnp.float32)
  (s1, s2), _ = jax.lax.scan(chunk, (zeros, zeros), jnp.arange(n_mc // mc_batch, dtype=jnp.int32))
  return s1 / n_mc, s2 / n_mc


def masked_diffusion_elbo(model, tokens, *, mask_id, key, n_mc=128, mc_batch=8, eps=1e-3,
                          shift=False, attention_mask=None):
  """MC estimate of the masked-diffusion NLL bound B(x) per sequence (formula: module docstring).

  Args:
    model: pytree callable, model(ids int32 [R, L], attention_mask=None) -> logits [R, L, V]
      (R = B * mc_batch rows per forward).
    tokens: int [B, L]. attention_mask: None or [B, L] (1 = real token; pads never masked/scored).
    mask_id: the [MASK] id. key: PRNG key. n_mc: samples per sequence, a multiple of mc_batch.
    eps: p_t = (1 - eps) t + eps. shift: True for Dream (shifted logits).
  Returns:
    ElboResult (nll_bound, nll_stderr, n_tokens; .nats_per_token, .perplexity()).
  """
  toks = common.require_2d_int("tokens", tokens).astype(np.int32)
  if n_mc < 1 or mc_batch < 1 or n_mc % mc_batch:
    raise ConfigError(f"n_mc={n_mc} must be a positive multiple of mc_batch={mc_batch}.")
  if not 0 <= eps < 1:
    raise ConfigError(f"eps={eps}: expected a value in [0, 1).")
  if key is None:
    raise ConfigError("the ELBO estimate is random: pass key=jax.random.key(...).")
  if attention_mask is None:
    real = np.ones(toks.shape, bool)
  else:
    real = np.asarray(attention_mask)
    if real.shape != toks.shape:
      raise ConfigError(f"attention_mask shape {real.shape} != tokens shape {toks.shape}.")
    real = real.astype(bool)
  scored = real.copy()
  if shift:  # the first real token of each row has no prediction after the shift
    first = np.argmax(real, axis=1)
    scored[np.arange(toks.shape[0]), first] = False
  if np.any(toks[real] == mask_id):
    raise ConfigError(f"tokens contain the mask id {mask_id}; the ELBO needs clean text.")
  n_tokens = scored.sum(axis=1)
  if np.any(n_tokens == 0):
    raise ConfigError(f"rows {np.nonzero(n_tokens == 0)[0].tolist()} have no scored token.")
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(toks.shape[0], dtype=jnp.int32))
  attn = None if attention_mask is None else jnp.asarray(real.astype(np.int32))
  mean, sq = _elbo_core(model, jnp.asarray(toks), jnp.asarray(scored), attn, keys,
                        mask_id=int(mask_id), n_mc=int(n_mc), mc_batch=int(mc_batch),
                        eps=float(eps), shift=bool(shift))
  mean, sq = np.asarray(mean, np.float64), np.asarray(sq, np.float64)
  stderr = np.sqrt(np.maximum(sq - mean * mean, 0.0) / n_mc)
  return ElboResult(nll_bound=mean, nll_stderr=stderr, n_tokens=n_tokens.astype(np.int64))
