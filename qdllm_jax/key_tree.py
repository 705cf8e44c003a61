"""The one key tree of a run: key(seed) folded with a purpose, so each kind of randomness has its own root.

  windows    fold_in(key(seed), 0)                   calibration windows (documents and offsets)
  masks      fold_in(fold_in(key(seed), 1), seed_x)  MCS masks (calib.mcs_mask: sample j uses fold_in(., j))
  eval       fold_in(key(seed), 2)                   the evaluation suite (the same key for FP and quantized)
  baselines  fold_in(key(seed), 3)                   rotations of the PTQ study's baselines
"""
from __future__ import annotations

import jax

PURPOSE = {"windows": 0, "masks": 1, "eval": 2, "baselines": 3}


def purpose_key(seed: int, purpose: str) -> jax.Array:
  """fold_in(key(seed), PURPOSE[purpose]): the root of one kind of randomness."""
  return jax.random.fold_in(jax.random.key(seed), PURPOSE[purpose])
