"""Pieces shared by the LLaDA and Dream samplers and the likelihood estimators.

* `shift_logits`: Dream's alignment (its logits at position i predict token i+1).
* `descending_ranks` / `topk_row_mask`: a per-row top-k with a per-row *traced* k, done with a rank
  mask so shapes stay static inside `lax.scan`.
* `resolve_float_dtype`: the float32 / float64 choice for the Gumbel noise (float64 needs x64 mode).
* `call_model`: the one place a model is called (`model(input_ids, attention_mask) -> logits`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from qdllm_jax.errors import ConfigError

_FLOAT_DTYPES = ("float32", "float64")


def call_model(model, input_ids, attention_mask):
  """logits = model(input_ids, attention_mask); input_ids int32 [B, T], mask [B, T] or None -> [B, T, V]."""
  if attention_mask is None:
    return model(input_ids)
  return model(input_ids, attention_mask=attention_mask)


def shift_logits(logits):
  """Dream alignment: out[:, 0] = logits[:, 0]; out[:, i] = logits[:, i - 1] for i >= 1.

  logits: [B, T, V] (any float dtype) -> [B, T, V], same dtype. After the shift, position i holds
  the model's prediction for token i (Dream's raw head predicts token i+1 at position i).
  """
  return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def descending_ranks(scores):
  """rank[..., i] = place of scores[..., i] in a stable descending sort of its row (0 = largest).

  scores: [..., N] float (may hold -inf). Ties go to the lower index first (torch.topk leaves tie
  order unspecified). Returns int32 [..., N].
  """
  order = jnp.argsort(-scores, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def topk_row_mask(scores, k):
  """Boolean mask of the k largest entries of each row: rank(scores[b, i]) < k[b].

  scores: [B, N] float; k: int [B] (traced, 0 <= k <= N). Returns bool [B, N] with exactly k[b]
  True entries in row b (ties broken towards the lower index).
  """
  return descending_ranks(scores) < k[:, None]


def resolve_float_dtype(dtype, what):
  """Return the numpy dtype name ("float32" / "float64") for noise of kind `what`.

  None picks float64 when JAX's x64 mode is on and the backend is not a TPU (the LLaDA reference
  draws its Gumbel noise in float64), else float32. float64 with x64 off is an error, because JAX
  would silently hand back float32.
  """
  if dtype is None:
    x64 = bool(jax.config.read("jax_enable_x64"))
    return "float64" if (x64 and jax.default_backend() != "tpu") else "float32"
  name = np.dtype(dtype).name
  if name not in _FLOAT_DTYPES:
    raise ConfigError(f"{what}={name!r}: expected float32 or float64.")
  if name == "float64" and not jax.config.read("jax_enable_x64"):
    raise ConfigError(
        f"{what}=float64 but JAX's x64 mode is off, so JAX would compute in float32. Either call "
        "jax.config.update('jax_enable_x64', True) at start-up, run inside "
        "`with jax.enable_x64(True):`, or pass float32.")
  return name


def require_2d_int(name, array):
  """Return `array` as a numpy int array of rank 2, or raise ConfigError naming what was found."""
  arr = np.asarray(array)
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
    raise ConfigError(
        f"{name}: expected an integer array [batch, length], got dtype {arr.dtype} and shape "
        f"{arr.shape}. Add a batch axis with x[None] for a single sequence.")
  return arr


def check_padding(prompt, attention_mask, mask_id, name="attention_mask"):
  """Validate a [B, P] pad mask (1 = real token) against prompt ids; returns it as an int32 array.

  Padded positions must not hold mask_id: the samplers decode every position equal to mask_id.
  """
  if attention_mask is None:
    return None
  am = np.asarray(attention_mask)
  if am.shape != prompt.shape:
    raise ConfigError(f"{name} has shape {am.shape}, expected the prompt's shape {prompt.shape}.")
  am = am.astype(np.int32)
  if not np.isin(am, (0, 1)).all():
    raise ConfigError(f"{name} must hold only 0 (padding) and 1 (real token).")
  if np.any((am == 0) & (prompt == mask_id)):
    raise ConfigError(
        f"padded prompt positions hold the mask id {mask_id}; they would be decoded as masks. "
        "Pad with a different id (e.g. EOS), as the LLaDA reference requires.")
  return am
