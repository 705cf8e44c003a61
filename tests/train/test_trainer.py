"""LLaDA objectives vs NumPy transcriptions, and the jitted AdamW step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdllm_jax.errors import ConfigError
from qdllm_jax.models import transformer
from qdllm_jax.models.llada import LLADA_TINY_TEST, llada_config
from qdllm_jax.train import objective, trainer

CFG = llada_config(LLADA_TINY_TEST)


def _np_ce(logits, ids):
  """-log softmax(logits)[id] in float64."""
  l = np.asarray(logits, np.float64)
  m = l.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(l - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(l, np.asarray(ids)[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.PRNGKey(0), std=0.2)


def test_forward_mask_statistics():
  ids = jnp.zeros((64, 512), jnp.int32) + 5
  noisy, masked, p = objective.forward_mask(jax.random.PRNGKey(3), ids, 120)
  p, masked, noisy = np.asarray(p), np.asarray(masked), np.asarray(noisy)
  assert np.all((p >= 1e-3) & (p <= 1.0))
  assert np.array_equal(noisy == 120, masked) and np.all(noisy[~masked] == 5)
  rate = masked.mean(1)  # each row masks Binomial(512, p_b) / 512 tokens
  assert np.all(np.abs(rate - p) < 5 * np.sqrt(p * (1 - p) / 512) + 1e-3)
  assert np.std(p) > 0.2  # t ~ U(0,1) per row: std ~ 0.289


def test_pretrain_loss_matches_numpy(params):
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 100)
  key = jax.random.PRNGKey(7)
  noisy, masked, p = objective.forward_mask(key, ids, CFG.mask_id)
  assert np.asarray(masked).any()
  logits = np.asarray(transformer.forward(params, CFG, noisy))
  ce = _np_ce(logits, ids)
  ref = np.sum(np.where(np.asarray(masked), ce / np.asarray(p, np.float64)[:, None], 0.0)) / (3 * 16)
  got = float(objective.pretrain_loss(params, CFG, ids, key))
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_sft_loss_matches_numpy_and_padding_is_invisible(params):
  rng = np.random.default_rng(0)
  lens, plens, width = [9, 12, 6], [4, 7, 2], 14
  ids = np.full((3, width), CFG.eos_id, np.int32)
  key_mask = np.zeros((3, width), bool)
  ans = np.zeros((3, width), bool)
  rows = []
  for r, (n, pl) in enumerate(zip(lens, plens)):
    row = rng.integers(0, 100, n)
    rows.append(row)
    ids[r, :n], key_mask[r, :n], ans[r, pl:n] = row, True, True
  key = jax.random.PRNGKey(11)
  noisy, masked, p = objective.forward_mask(key, jnp.asarray(ids), CFG.mask_id, maskable=jnp.asarray(ans))
  noisy, masked, p = np.asarray(noisy), np.asarray(masked), np.asarray(p, np.float64)
  assert not masked[~ans].any()  # the prompt and the padding are never masked
  per_row = []
  for r, (n, pl) in enumerate(zip(lens, plens)):  # each row on its own, unpadded
    logits = np.asarray(transformer.forward(params, CFG, jnp.asarray(noisy[r:r + 1, :n])))[0]
    ce = _np_ce(logits, rows[r])
    per_row.append(np.sum(np.where(masked[r, :n], ce / p[r], 0.0)) / (n - pl))
  got = float(objective.sft_loss(params, CFG, jnp.asarray(ids), jnp.asarray(key_mask), jnp.asarray(ans), key))
  np.testing.assert_allclose(got, np.mean(per_row), rtol=1e-5)


def test_uniform_model_loss_is_log_v_times_weights():
  """With a zero LM head every masked CE is log V, so L_pre = log V * sum_masked(1/p) / (B L)."""
  p0 = transformer.init_params(CFG, jax.random.PRNGKey(0))
  p0["head"] = jnp.zeros_like(p0["head"])
  ids = jax.random.randint(jax.random.PRNGKey(2), (4, 32), 0, 100)
  key = jax.random.PRNGKey(5)
  _, masked, p = objective.forward_mask(key, ids, CFG.mask_id)
  w = np.sum(np.asarray(masked) / np.asarray(p, np.float64)[:, None])
  np.testing.assert_allclose(float(objective.pretrain_loss(p0, CFG, ids, key)), np.log(CFG.vocab_size) * w / 128,
                             rtol=1e-5)


def test_train_step_decreases_loss(params):
  tc = trainer.TrainConfig(phases=[trainer.Phase(20)], warmup=2, lr=3e-3)
  opt = trainer.make_optimizer(tc, 20)
  batch = {"ids": jax.random.randint(jax.random.PRNGKey(4), (4, 16), 0, 100),
           "task_ids": jax.random.randint(jax.random.PRNGKey(5), (4, 8), 0, 100),
           "task_key_mask": jnp.ones((4, 8), bool), "task_loss_mask": jnp.arange(8)[None, :].repeat(4, 0) >= 3}
  key = jax.random.PRNGKey(9)
  p = jax.tree_util.tree_map(jnp.copy, params)
  l0 = float(trainer.total_loss(p, CFG, batch, key, 1.0)[0])
  state = opt.init(p)
  for _ in range(8):
    p, state, m = trainer.train_step(p, state, batch, key, cfg=CFG, opt=opt)
    assert np.isfinite(float(m["loss"]))
  l1 = float(trainer.total_loss(p, CFG, batch, key, 1.0)[0])
  assert l1 < 0.8 * l0, (l0, l1)


def test_train_config_rejects_bad_values():
  with pytest.raises(ConfigError, match="warmup"):
    trainer.TrainConfig(phases=[trainer.Phase(10)], warmup=10)
  with pytest.raises(ConfigError, match="batch"):
    trainer.TrainConfig(phases=[trainer.Phase(200, batch=0)])
  with pytest.raises(ConfigError, match="phases is empty"):
    trainer.TrainConfig(phases=())
  with pytest.raises(ConfigError, match="steps:batch:task_batch:task_weight"):
    trainer.Phase.parse("900:8:96")
  assert trainer.Phase.parse("900:8:0:0.5") == trainer.Phase(900, 8, 0, 0.5)


def test_phases_batches_and_loss(params):
  """Global steps map to their phase; a phase without task rows draws corpus windows only and optimises L_pre."""
  tc = trainer.TrainConfig(phases=[trainer.Phase(4, batch=3, task_batch=0), trainer.Phase(6, batch=2)], warmup=2,
                           seq_len=16)
  assert tc.total_steps == 10 and tc.phase_at(3)[0] == 0 and tc.phase_at(4)[0] == 1 and tc.phase_at(9)[0] == 1
  with pytest.raises(ConfigError, match="past the last phase"):
    tc.phase_at(10)
  stream = np.arange(1000, dtype=np.int32) % 100
  b = trainer.host_batch(tc, 3, stream, None, ())          # no task rows: needs no tokenizer and no families
  assert set(b) == {"ids"} and b["ids"].shape == (3, 16)
  np.testing.assert_array_equal(b["ids"], trainer.host_batch(tc, 3, stream, None, ())["ids"])  # seeded by step
  key = jax.random.PRNGKey(2)
  loss, (l_pre, l_sft) = trainer.total_loss(params, CFG, {"ids": jnp.asarray(b["ids"])}, key, 1.0)
  assert float(l_sft) == 0.0 and float(loss) == float(l_pre)
  np.testing.assert_allclose(float(l_pre), float(objective.pretrain_loss(params, CFG, jnp.asarray(b["ids"]),
                                                                          jax.random.fold_in(key, 0))), rtol=1e-6)
  with pytest.raises(ConfigError, match="start_phase"):
    trainer.train(CFG, tc, stream, None, (), start_phase=1)  # resuming needs the earlier phases' weights
