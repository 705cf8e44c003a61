"""Defaults shared by every run config. Each `configs/<run>.py` starts from `get_base()` and overrides.

Every key that exists here is a valid key; `qdllm_jax.config.validate` refuses any other key and any
invalid value before heavy work starts. Keys (papers' settings as defaults; see shared reference docs):
"""
import ml_collections as mlc


def get_base():
  c = mlc.ConfigDict()
  c.model_path = ""               # local HF directory (config.json + safetensors + tokenizer)
  c.model_preset = ""             # "llada_8b" | "dream_7b": architecture for --dry_run without weights
  c.dtype = "bfloat16"            # params dtype for calibration/eval: "float32" | "bfloat16"
  c.workdir = ""                  # output directory (checkpoint, report, plots, resume state)
  c.seed = 0                      # root of the one key tree (windows, masks, timesteps, eval)

  c.calib = mlc.ConfigDict()
  c.calib.source = "c4"           # "corpus" (shipped text) | a local text/JSONL file or directory | "c4"/"wikitext2" (datasets, offline cache)
  c.calib.nsamples = 128
  c.calib.seqlen = 4096
  c.calib.mcs = True              # Masked Calibration Simulation (False: plain unmasked text, as AR PTQ)
  c.calib.prefix_ratio = 0.25     # visible prefix gamma
  c.calib.timesteps_per_sample = 1
  c.calib.seed_x = 0              # mask seed (0 for LLaDA, 100 for Dream in the released code)
  c.calib.chunk_size = 8          # sequences per forward chunk when capturing Hessians

  c.quant = mlc.ConfigDict()
  c.quant.method = "quant_dllm"   # "quant_dllm" | "gptq" | "rtn"
  c.quant.bits = 2                # quant_dllm: mean planes (1..3); gptq/rtn: 2..8
  c.quant.group_size = 128
  c.quant.abmp_ratio = 0.05       # 0.05 LLaDA, 0.10 Dream; 0 = uniform order
  c.quant.abmp_scope = "matrix"   # "matrix" (released code) | "global" (one budget across the model)
  c.quant.target_bpw = 0.0        # global scope: exact true bits/weight target (0 = mean order = bits)
  c.quant.dor = True              # data-aware objective reweighting (salience)
  c.quant.outlier_z = 2.0
  c.quant.salient_weight = 3.0
  c.quant.rsr_iters = 15
  c.quant.compensation = True     # cross-block GPTQ/OBC error compensation
  c.quant.z_diag = "chol"
  c.quant.percdamp = 0.01
  c.quant.sym = False             # gptq/rtn: symmetric grid (False = asymmetric min/max, as original GPTQ)
  c.quant.act_order = False
  c.quant.module_order = "standard"   # "standard" | "llada_runner"
  c.quant.rules = ()              # ((regex, {"method":..,"bits":..} or "skip"), ...), first match wins
  c.quant.embeddings = "fp"       # embeddings and LM head stay full precision (both papers)
  c.quant.head = "fp"

  c.eval = mlc.ConfigDict()
  c.eval.protocol = "tiny"        # named protocol from qdllm_jax.eval.protocols
  c.eval.fp = True                # evaluate the FP model too
  c.eval.quantized = True
  c.eval.limit = 0                # 0 = the protocol's full task sets

  c.mesh = mlc.ConfigDict()
  c.mesh.shape = (1,)
  c.mesh.axes = ("data",)
  c.distributed = False           # jax.distributed.initialize() on multi-host pods

  c.report = mlc.ConfigDict()
  c.report.plots = True
  return c
