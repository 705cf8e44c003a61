"""Method presets shared by every model config: `--config configs/<model>.py:<preset>[,<preset>...]`.

  quant_dllm_w2      Quant-dLLM (MCS + DAQ with DOR and RSR + ABMP + compensation), 2 planes/weight (default)
  rtn_w2/w3/w4       round-to-nearest, asymmetric min/max, group 128
  gptq_w2/w3/w4      GPTQ, asymmetric min/max, group 128, damp 0.01
  no_mcs             ablation: plain unmasked calibration windows (Table 2a)
  no_dor             ablation: RSR without the data-aware objective (Table 2c)
  no_abmp            ablation: ABMP ratio 0, uniform order 2 (Table 2b)
  no_comp            ablation: no cross-block error compensation
  block_comp         extension: exact block OBS compensation E = (W1 - W^1) U_bb^-1 instead of the released
                     diagonal form (not in the paper; see docs/results.md)
  order1 / order3    uniform DAQ order 1 / 3 (1 / 3 planes per weight)
Ablations combine with a method: `configs/llada8b.py:no_mcs,no_dor`. Baselines keep MCS calibration of the
model config unless `no_mcs` is added (Quant-dLLM's baselines were calibrated on the same C4 windows).
"""


def _method(method, bits):
  def f(c):
    c.quant.method, c.quant.bits = method, bits
  return f


def _set(**kv):
  def f(c):
    for k, v in kv.items():
      sect, key = k.split("__")
      setattr(getattr(c, sect), key, v)
  return f


PRESETS = {
    "quant_dllm_w2": _method("quant_dllm", 2),
    "rtn_w2": _method("rtn", 2), "rtn_w3": _method("rtn", 3), "rtn_w4": _method("rtn", 4),
    "gptq_w2": _method("gptq", 2), "gptq_w3": _method("gptq", 3), "gptq_w4": _method("gptq", 4),
    "no_mcs": _set(calib__mcs=False),
    "no_dor": _set(quant__dor=False),
    "no_abmp": _set(quant__abmp_ratio=0.0),
    "no_comp": _set(quant__compensation=False),
    "block_comp": _set(quant__comp_mode="block"),
    "order1": _set(quant__method="quant_dllm", quant__bits=1),
    "order3": _set(quant__method="quant_dllm", quant__bits=3),
}
DEFAULT = "quant_dllm_w2"


def apply(c, arg=None):
  """Apply the comma-separated presets named in `arg` (None/"" = DEFAULT) to ConfigDict `c`; returns `c`.

  Raises ValueError naming the unknown preset and listing the known ones (qdllm_jax.config turns it into a
  ConfigError when loading through the launcher).
  """
  names = [n.strip() for n in (arg or DEFAULT).split(",") if n.strip()]
  for n in names:
    if n not in PRESETS:
      raise ValueError(f"unknown method preset {n!r}; expected one of {sorted(PRESETS)} "
                       "(comma-separated, e.g. 'gptq_w3' or 'no_mcs,no_dor')")
    PRESETS[n](c)
  return c
