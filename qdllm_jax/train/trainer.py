"""Training loop of the tiny LLaDA: AdamW + linear warmup / cosine decay, one jitted step, seeded data.

Two phases. (1) `pretrain_steps` steps of pure pretraining, L = L_pre(corpus windows): the LLaDA objective sits
on a unigram plateau for hundreds of steps (docs/evaluation.md), and task rows in the batch keep it there.
(2) `steps` steps of L = L_pre(corpus windows) + task_weight * L_sft(task rows) (objective.py): every batch
mixes pretraining-form corpus text and SFT-form task examples (prompt never masked). Each phase has its own
AdamW state and warmup / cosine schedule. Determinism: the noise key of global step s (phase 2 continues the
count of phase 1) is fold_in(PRNGKey(seed), s) and the host batches come from numpy.random.default_rng([seed, s]),
so a run is a pure function of (seed, config), also across restarts.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qdllm_jax.errors import ConfigError
from qdllm_jax.models import transformer
from qdllm_jax.models.config import ModelConfig
from qdllm_jax.train import objective


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and data hyper-parameters (all steps / sizes in units of optimizer steps / tokens)."""
  seed: int = 0
  steps: int = 1500          # phase 2: corpus + task rows
  pretrain_steps: int = 0    # phase 1: corpus only, before phase 2
  batch: int = 32            # corpus windows per step
  seq_len: int = 128         # corpus window length
  task_batch: int = 64       # task rows per step
  task_width: int = 24       # task row width (EOS-padded)
  task_weight: float = 1.0
  lr: float = 2e-3
  min_lr_ratio: float = 0.05
  warmup: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  clip: float = 1.0
  log_every: int = 25

  def __post_init__(self):
    for f in ("steps", "batch", "seq_len", "task_batch", "task_width"):
      if getattr(self, f) <= 0:
        raise ConfigError(f"TrainConfig.{f}={getattr(self, f)}; expected a positive integer")
    if not 0 <= self.warmup < self.steps:
      raise ConfigError(f"TrainConfig.warmup={self.warmup}; expected 0 <= warmup < steps={self.steps}")
    if self.pretrain_steps < 0 or 0 < self.pretrain_steps <= self.warmup:
      raise ConfigError(f"TrainConfig.pretrain_steps={self.pretrain_steps}; expected 0 (no pretraining phase) or "
                        f"more than warmup={self.warmup}")


def make_optimizer(tc: TrainConfig, steps: int | None = None) -> optax.GradientTransformation:
  """clip_by_global_norm(clip) -> AdamW(lr_s, b1, b2, wd on matrices only), lr_s warmup_cosine_decay over
  `steps` (default tc.steps)."""
  steps = tc.steps if steps is None else steps
  sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, steps, tc.lr * tc.min_lr_ratio)
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(tc.clip),
                     optax.adamw(sched, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def total_loss(params, cfg: ModelConfig, batch: dict, key: jax.Array, task_weight: float):
  """L_pre(batch['ids']) + task_weight * L_sft(batch['task_*']); returns (loss, (l_pre, l_sft)).
  A batch without task rows (phase 1) gives L_pre alone and l_sft = 0."""
  l_pre = objective.pretrain_loss(params, cfg, batch["ids"], jax.random.fold_in(key, 0))
  if "task_ids" not in batch:
    return l_pre, (l_pre, jnp.zeros((), jnp.float32))
  l_sft = objective.sft_loss(params, cfg, batch["task_ids"], batch["task_key_mask"], batch["task_loss_mask"],
                             jax.random.fold_in(key, 1))
  return l_pre + task_weight * l_sft, (l_pre, l_sft)


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "task_weight"), donate_argnums=(0, 1))
def train_step(params, opt_state, batch: dict, key: jax.Array, *, cfg: ModelConfig,
               opt: optax.GradientTransformation, task_weight: float = 1.0):
  """One AdamW step on total_loss; returns (params, opt_state, metrics {loss, l_pre, l_sft, grad_norm})."""
  (loss, (l_pre, l_sft)), grads = jax.value_and_grad(total_loss, has_aux=True)(params, cfg, batch, key, task_weight)
  updates, opt_state = opt.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"loss": loss, "l_pre": l_pre, "l_sft": l_sft, "grad_norm": optax.global_norm(grads)}


def host_batch(tc: TrainConfig, step: int, stream: np.ndarray, tok, families) -> dict:
  """The numpy batch of global `step`: corpus windows, and in phase 2 task rows, from default_rng([seed, step])."""
  from qdllm_jax.data import windows
  rng = np.random.default_rng([tc.seed, step])
  if step < tc.pretrain_steps:
    return {"ids": windows.corpus_batch(stream, rng, tc.batch, tc.seq_len)}
  tb = windows.task_batch(tok, rng, tc.task_batch, tc.task_width, families)
  return {"ids": windows.corpus_batch(stream, rng, tc.batch, tc.seq_len), "task_ids": tb["ids"],
          "task_key_mask": tb["key_mask"], "task_loss_mask": tb["loss_mask"]}


def train(cfg: ModelConfig, tc: TrainConfig, stream: np.ndarray, tok, families, params=None,
          log: Callable[[str], None] = print, eval_fn: Callable | None = None, eval_every: int = 0) -> tuple:
  """Run tc.pretrain_steps + tc.steps steps from init_params(cfg, fold_in(PRNGKey(seed), 10**9)) (or `params`).

  eval_fn(params, step) -> dict is called every eval_every steps of phase 2 (0: never) and its metrics logged.
  Returns (params, history) with history = list of dicts {step, loss, l_pre, l_sft, grad_norm, elapsed}
  (global step numbers; l_sft = 0 in phase 1).
  """
  base = jax.random.PRNGKey(tc.seed)
  if params is None:
    params = transformer.init_params(cfg, jax.random.fold_in(base, 10**9))
  total = tc.pretrain_steps + tc.steps
  history, t0 = [], time.time()
  acc = {"loss": 0.0, "l_pre": 0.0, "l_sft": 0.0, "grad_norm": 0.0}
  for step in range(total):
    if step in (0, tc.pretrain_steps):  # a new phase: fresh AdamW state and schedule
      opt = make_optimizer(tc, tc.pretrain_steps if step < tc.pretrain_steps else tc.steps)
      opt_state = opt.init(params)
      log(f"phase {'1 (corpus only)' if step < tc.pretrain_steps else '2 (corpus + tasks)'} from step {step}")
    batch = {k: jnp.asarray(v) for k, v in host_batch(tc, step, stream, tok, families).items()}
    params, opt_state, m = train_step(params, opt_state, batch, jax.random.fold_in(base, step), cfg=cfg, opt=opt,
                                      task_weight=tc.task_weight)
    for k in acc:
      acc[k] += float(m[k])
    if (step + 1) % tc.log_every == 0 or step + 1 == total:
      n = (step % tc.log_every) + 1
      rec = {"step": step + 1, **{k: v / n for k, v in acc.items()}, "elapsed": time.time() - t0}
      history.append(rec)
      log(f"step {rec['step']:5d}  loss {rec['loss']:.4f}  pre {rec['l_pre']:.4f}  sft {rec['l_sft']:.4f}  "
          f"gnorm {rec['grad_norm']:.3f}  {rec['elapsed']:.0f}s")
      acc = dict.fromkeys(acc, 0.0)
    done2 = step + 1 - tc.pretrain_steps
    if eval_fn is not None and eval_every and done2 > 0 and done2 % eval_every == 0 and step + 1 < total:
      log(f"eval @ {step + 1}: {eval_fn(params, step + 1)}")
  return params, history
