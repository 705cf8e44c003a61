"""Training loop of the tiny LLaDA: AdamW + linear warmup / cosine decay, one jitted step, seeded data.

A run is a sequence of phases (`Phase`). Every step of a phase optimises
    L = L_pre(corpus windows) + task_weight * L_sft(task rows)            (objective.py)
with `batch` corpus windows and `task_batch` SFT-form task rows (prompt never masked; task_batch = 0 gives pure
pretraining). Each phase starts a fresh AdamW state and its own warmup / cosine schedule. The shipped model is
one phase (its corpus loss stays on LLaDA's long unigram plateau); docs/evaluation.md measures two-phase recipes
(pure pretraining first; a continuation on more corpus with fewer, down-weighted task rows).
Determinism: the noise key of global step s (steps count on across phases) is fold_in(PRNGKey(seed), s) and the
host batches come from numpy.random.default_rng([seed, s]), so a run is a pure function of (seed, config), also
across restarts and when a run resumes at a phase boundary from the weights the earlier phases produced.
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

from qdllm_jax.data import sequences
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import transformer
from qdllm_jax.models.model_config import ModelConfig
from qdllm_jax.train import objective


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: `steps` optimizer steps on `batch` corpus windows + `task_batch` task rows per step."""
  steps: int
  batch: int = 8             # corpus windows per step
  task_batch: int = 96       # task rows per step (0: pure pretraining)
  task_weight: float = 1.0

  @classmethod
  def parse(cls, text: str) -> "Phase":
    """'steps:batch:task_batch:task_weight' (e.g. '900:8:96:1.0') -> Phase."""
    parts = text.split(":")
    if len(parts) != 4:
      raise ConfigError(f"phase {text!r}: expected steps:batch:task_batch:task_weight, e.g. 900:8:96:1.0")
    return cls(int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and data hyper-parameters (steps in optimizer steps, sizes in tokens / rows)."""
  seed: int = 0
  phases: tuple = (Phase(900),)
  seq_len: int = 128         # corpus window length
  task_width: int = 24       # task row width (EOS-padded)
  lr: float = 2e-3
  min_lr_ratio: float = 0.05
  warmup: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  clip: float = 1.0
  log_every: int = 25

  def __post_init__(self):
    object.__setattr__(self, "phases", tuple(self.phases))
    if not self.phases:
      raise ConfigError("TrainConfig.phases is empty; give at least one Phase(steps, ...)")
    for f in ("seq_len", "task_width"):
      if getattr(self, f) <= 0:
        raise ConfigError(f"TrainConfig.{f}={getattr(self, f)}; expected a positive integer")
    for i, ph in enumerate(self.phases):
      if ph.batch <= 0 or ph.task_batch < 0 or ph.task_weight < 0:
        raise ConfigError(f"TrainConfig.phases[{i}]={ph}; expected batch > 0, task_batch >= 0, task_weight >= 0")
      if not 0 <= self.warmup < ph.steps:
        raise ConfigError(f"TrainConfig.warmup={self.warmup}; expected 0 <= warmup < steps of every phase "
                          f"(phases[{i}].steps={ph.steps})")

  @property
  def total_steps(self) -> int:
    return sum(ph.steps for ph in self.phases)

  def phase_at(self, step: int) -> tuple[int, Phase]:
    """(index, phase) of global step `step`."""
    end = 0
    for i, ph in enumerate(self.phases):
      end += ph.steps
      if step < end:
        return i, ph
    raise ConfigError(f"step {step} is past the last phase ({self.total_steps} steps)")


def make_optimizer(tc: TrainConfig, steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm(clip) -> AdamW(lr_s, b1, b2, wd on matrices only), lr_s warmup_cosine_decay over
  `steps` (one phase)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, steps, tc.lr * tc.min_lr_ratio)
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(tc.clip),
                     optax.adamw(sched, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def total_loss(params, cfg: ModelConfig, batch: dict, key: jax.Array, task_weight: float):
  """L_pre(batch['ids']) + task_weight * L_sft(batch['task_*']); returns (loss, (l_pre, l_sft)).
  A batch without task rows (task_batch = 0) gives L_pre alone and l_sft = 0."""
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
  """The numpy batch of global `step` from default_rng([seed, step]): the task rows of its phase (if any), then
  its corpus windows."""
  rng = np.random.default_rng([tc.seed, step])
  _, ph = tc.phase_at(step)
  if ph.task_batch == 0:
    return {"ids": sequences.corpus_batch(stream, rng, ph.batch, tc.seq_len)}
  tb = sequences.task_batch(tok, rng, ph.task_batch, tc.task_width, families)
  return {"ids": sequences.corpus_batch(stream, rng, ph.batch, tc.seq_len), "task_ids": tb["ids"],
          "task_key_mask": tb["key_mask"], "task_loss_mask": tb["loss_mask"]}


def train(cfg: ModelConfig, tc: TrainConfig, stream: np.ndarray, tok, families, params=None, start_phase: int = 0,
          log: Callable[[str], None] = print, eval_fn: Callable | None = None, eval_every: int = 0) -> tuple:
  """Run the phases of tc from init_params(cfg, fold_in(PRNGKey(seed), 10**9)), or from `params`.

  start_phase > 0 resumes at that phase boundary: `params` must be the weights the earlier phases produced
  (global step numbering, hence keys and batches, continue as in a full run).
  eval_fn(params, step) -> dict is called every eval_every steps of each phase (0: never) and its metrics logged.
  Returns (params, history) with history = list of dicts {step, loss, l_pre, l_sft, grad_norm, elapsed}
  (global step numbers; l_sft = 0 in steps without task rows).
  """
  if not 0 <= start_phase < len(tc.phases) or (start_phase > 0 and params is None):
    raise ConfigError(f"start_phase={start_phase}: expected 0 <= start_phase < {len(tc.phases)} phases, and the "
                      "weights of the earlier phases as params when > 0")
  base = jax.random.PRNGKey(tc.seed)
  if params is None:
    params = transformer.init_params(cfg, jax.random.fold_in(base, 10**9))
  history, t0 = [], time.time()
  acc = {"loss": 0.0, "l_pre": 0.0, "l_sft": 0.0, "grad_norm": 0.0}
  step = sum(ph.steps for ph in tc.phases[:start_phase])
  for i in range(start_phase, len(tc.phases)):
    ph = tc.phases[i]
    opt = make_optimizer(tc, ph.steps)  # a fresh AdamW state and schedule per phase
    opt_state = opt.init(params)
    log(f"phase {i} from step {step}: {ph}")
    for j in range(ph.steps):
      batch = {k: jnp.asarray(v) for k, v in host_batch(tc, step, stream, tok, families).items()}
      params, opt_state, m = train_step(params, opt_state, batch, jax.random.fold_in(base, step), cfg=cfg, opt=opt,
                                        task_weight=ph.task_weight)
      for k in acc:
        acc[k] += float(m[k])
      step += 1
      if (j + 1) % tc.log_every == 0 or j + 1 == ph.steps:
        n = (j % tc.log_every) + 1
        rec = {"step": step, **{k: v / n for k, v in acc.items()}, "elapsed": time.time() - t0}
        history.append(rec)
        log(f"step {rec['step']:5d}  loss {rec['loss']:.4f}  pre {rec['l_pre']:.4f}  sft {rec['l_sft']:.4f}  "
            f"gnorm {rec['grad_norm']:.3f}  {rec['elapsed']:.0f}s")
        acc = dict.fromkeys(acc, 0.0)
      if eval_fn is not None and eval_every and (j + 1) % eval_every == 0 and step < tc.total_steps:
        log(f"eval @ {step}: {eval_fn(params, step)}")
  return params, history
