"""MCS: Masked Calibration Simulation (Quant-dLLM §2), as in the released `utils/mcs.py`.

For N windows of length L, sample i gets its own timestep and mask:
    t_i    = (i + 1) / N                       (grid {1/N, ..., 1})
    u      ~ U[0, 1)^L from fold_in(key(seed_x), i)
    mask   = u < t_i, and mask[:int(prefix_ratio L)] = False   (visible prefix, prefix_ratio 0.25)
    x~_i   = where(mask, MASK_ID, x_i)
so at t = 1 the whole suffix is masked and no sample is fully visible. Torch's RNG cannot be reproduced
bit-for-bit; `fold_in(key, i)` replaces `seed_x + i`.

Variants:
  * `mode="plain"`: unmasked windows (how AR PTQ calibrates: no [MASK] tokens, no timesteps).
  * `timesteps_per_sample=T > 1`: each window is repeated at T stratified timesteps; copy s of window i is
    row j = i T + s with t_j = (s + (i + 1)/N) / T and u from fold_in(key, j). Every window sees every
    stratum [s/T, (s+1)/T), the N T timesteps together are the grid {1/(NT), ..., 1}, and T = 1 reduces
    exactly to the released rule.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qdllm_jax.calib.text_windows import as_key
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import family_of
from qdllm_jax.models.model_config import ModelConfig

MODES = ("mcs", "plain")


def mcs_timesteps(n_windows: int, timesteps_per_sample: int = 1) -> jax.Array:
  """float32 [N T]: t_{iT+s} = (s + (i+1)/N) / T  (T = 1: t_i = (i+1)/N)."""
  i = jnp.arange(n_windows, dtype=jnp.float32)[:, None]
  s = jnp.arange(timesteps_per_sample, dtype=jnp.float32)[None, :]
  return ((s + (i + 1.0) / n_windows) / timesteps_per_sample).reshape(-1)


@functools.partial(jax.jit, static_argnames=("mask_id", "prefix_len", "timesteps_per_sample"))
def _mcs(ids, key, mask_id, prefix_len, timesteps_per_sample):
  n, seqlen = ids.shape
  rows = jnp.repeat(ids, timesteps_per_sample, axis=0)
  t = mcs_timesteps(n, timesteps_per_sample)
  pos = jnp.arange(seqlen)

  def one(j, t_j):
    u = jax.random.uniform(jax.random.fold_in(key, j), (seqlen,), dtype=jnp.float32)
    return (u < t_j) & (pos >= prefix_len)

  mask = jax.vmap(one)(jnp.arange(n * timesteps_per_sample), t)
  return jnp.where(mask, jnp.int32(mask_id), rows), mask, t


def mcs_mask(ids, key, mask_id: int, *, mode: str = "mcs", prefix_ratio: float = 0.25,
             timesteps_per_sample: int = 1):
  """Mask calibration windows for a diffusion LM.

  Args:
    ids: int32 [N, L] windows (from `calib.windows.make_windows`).
    key: int seed_x or JAX key; sample j draws u from fold_in(key, j).
    mask_id: the [MASK] token id (LLaDA 126336, Dream 151666).
    mode: "mcs" (masked, the Quant-dLLM default) or "plain" (unmasked).
    prefix_ratio: visible prefix fraction gamma; the first int(gamma L) positions are never masked.
    timesteps_per_sample: T >= 1 stratified timesteps per window (see module docstring).
  Returns:
    (masked ids int32 [N T, L], mask bool [N T, L], t float32 [N T]); plain: (ids, all-False, zeros).
  Raises:
    ConfigError: unknown mode, prefix_ratio outside [0, 1], T < 1, T > 1 with mode "plain".
  """
  ids = jnp.asarray(ids, jnp.int32)
  if ids.ndim != 2:
    raise ConfigError(f"mcs_mask: ids has shape {ids.shape}; expected [N, L] token windows")
  if mode not in MODES:
    raise ConfigError(f"mcs_mask: mode={mode!r}; expected one of {MODES}")
  if not 0.0 <= prefix_ratio <= 1.0:
    raise ConfigError(f"mcs_mask: prefix_ratio={prefix_ratio}; expected a fraction in [0, 1] (default 0.25)")
  if int(timesteps_per_sample) < 1:
    raise ConfigError(f"mcs_mask: timesteps_per_sample={timesteps_per_sample}; expected >= 1")
  if mode == "plain":
    if timesteps_per_sample != 1:
      raise ConfigError("mcs_mask: timesteps_per_sample > 1 needs mode='mcs' (plain windows have no timestep)")
    return ids, jnp.zeros(ids.shape, bool), jnp.zeros((ids.shape[0],), jnp.float32)
  prefix_len = int(prefix_ratio * ids.shape[1])
  return _mcs(ids, as_key(key), int(mask_id), prefix_len, int(timesteps_per_sample))


def calibration_inputs(ids, cfg: ModelConfig, *, mode: str = "mcs", seed_x: int | None = None,
                       prefix_ratio: float = 0.25, timesteps_per_sample: int = 1) -> jax.Array:
  """The token ids the model is calibrated on: `mcs_mask` with the model's mask id and seed.

  Args:
    ids: int32 [N, L] windows.
    cfg: the model config (gives `mask_id`, e.g. BERT's tokenizer [MASK] 103, and through its family the
      default seed_x: LLaDA 0 and Dream 100 as the released calibration scripts, BERT 0).
  Returns:
    int32 [N T, L].
  Raises:
    ConfigError: mode "mcs" on a config without a mask token id.
  """
  if mode == "mcs" and cfg.mask_id is None:
    raise ConfigError(f"MCS calibration needs the model's [MASK] id, but this {cfg.arch} config has none; "
                      "set mask_token_id in config.json or calibrate with mode='plain'")
  seed = family_of(cfg).calib_seed if seed_x is None else seed_x
  out, _, _ = mcs_mask(ids, seed, cfg.mask_id if cfg.mask_id is not None else -1, mode=mode,
                       prefix_ratio=prefix_ratio, timesteps_per_sample=timesteps_per_sample)
  return out
