"""Defaults shared by every run config. Each `configs/<run>.py` starts from `get_base()` and overrides.

Every key that exists here is a valid key; `qdllm_jax.config.validate` refuses any other key and any
invalid value before heavy work starts (papers' settings as defaults:
Quant-dLLM, arXiv 2510.03274, experimental settings).
Keys marked (non-semantic) do not change the quantized checkpoint and are left out of the workdir
fingerprint, so changing them never blocks a resume.
"""
import ml_collections as mlc


def get_base():
  """The full schema with its default values (a ConfigDict)."""
  c = mlc.ConfigDict()
  c.model_path = ""               # local HF directory (config.json + safetensors + tokenizer) (non-semantic)
  c.model_preset = ""             # "llada_8b" | "dream_7b" | "tiny_llada": architecture for --dry_run (no weights)
  c.dtype = "auto"                # params dtype for calibration/eval: "auto" (as stored) | "float32" | "bfloat16"
  c.workdir = ""                  # output directory; --workdir overrides it (non-semantic)
  c.seed = 0                      # root of the one key tree: fold_in(key(seed), purpose) for windows/masks/eval

  c.calib = mlc.ConfigDict()
  c.calib.source = "c4"           # "corpus" (shipped KJV) | "c4" / "wikitext2" (HF datasets cache, offline) | a local
                                  # .txt / .jsonl / .json / .json.gz / .parquet file or a directory of them
  c.calib.text_field = "text"     # JSON field holding the document text
  c.calib.nsamples = 128
  c.calib.seqlen = 4096
  c.calib.mcs = True              # Masked Calibration Simulation (False: plain unmasked text, as AR PTQ)
  c.calib.prefix_ratio = 0.25     # visible prefix gamma
  c.calib.timesteps_per_sample = 1
  c.calib.seed_x = 0              # mask seed (0 for LLaDA, 100 for Dream in the released code)
  c.calib.chunk_size = 8          # sequences per jitted block pass when capturing Hessians
  c.calib.offload = "auto"        # calibration activations: "auto" (host if they do not fit) | "host" | "device"

  c.quant = mlc.ConfigDict()
  c.quant.method = "quant_dllm"   # "quant_dllm" | "gptq" | "rtn"
  c.quant.bits = 2                # quant_dllm: mean binary planes (1..3); gptq/rtn: 2..8
  c.quant.group_size = 128        # column block (quant_dllm, multiple of 32) or quantization group (gptq/rtn; -1 = row)
  c.quant.abmp_ratio = 0.05       # 0.05 LLaDA, 0.10 Dream; 0 = uniform order (quant_dllm bits=2 only)
  c.quant.abmp_scope = "matrix"   # "matrix" (released code) | "global" (one budget across the model)
  c.quant.target_bpw = 0.0        # global scope: true bits/weight target (0 = the cost of uniform order 2)
  c.quant.dor = True              # data-aware objective reweighting (salience)
  c.quant.outlier_z = 2.0
  c.quant.salient_weight = 3.0
  c.quant.rsr_iters = 15
  c.quant.compensation = True     # cross-block GPTQ/OBC error compensation
  c.quant.comp_mode = "diag"      # "diag": E = (W1 - W^1) / diag(U_bb) (released code) | "block": exact block OBS
                                  # update E = (W1 - W^1) U_bb^-1 (ours; docs/results.md, why DAQ trails GPTQ)
  c.quant.z_diag = "chol"         # "chol" | "inv_diag"
  c.quant.percdamp = 0.01
  c.quant.scale_dtype = "float16"  # stored scales: "float16" | "bfloat16" | "float32"
  c.quant.sym = False             # gptq/rtn: symmetric grid (False = asymmetric min/max, as original GPTQ)
  c.quant.act_order = False       # gptq only
  c.quant.module_order = "standard"   # "standard" | "llada_runner"
  c.quant.rules = ()              # ((regex, {"method", "bits", "group_size", "options"} or "skip"), ...), first match
                                  # wins; empty: every block linear gets the rule made of the keys above
  c.quant.embeddings = "fp"       # embeddings and LM head stay full precision (both papers); only "fp"
  c.quant.head = "fp"

  c.eval = mlc.ConfigDict()       # (non-semantic)
  c.eval.protocol = "tiny"        # named protocol from qdllm_jax.eval.protocols ("" = no evaluation)
  c.eval.fp = True                # evaluate the FP model too
  c.eval.quantized = True
  c.eval.limit = 0                # examples per task family; 0 = the protocol's own setting
  c.eval.ignore_cfg = False       # lm-eval protocols with classifier-free guidance (qdlm_dream cfg 1.0) are refused
                                  # unless True: then they run without guidance and the report records it
  c.eval.include_path = ""        # lm-eval protocols: a local directory of task YAMLs (offline task data)
  c.eval.task_map = ()            # lm-eval protocols: ("protocol_task=local_task", ...) to run a local copy instead

  c.mesh = mlc.ConfigDict()
  c.mesh.shape = ()               # () = auto: all devices, data-parallel unless the model axis is needed to fit
  c.mesh.axes = ("data", "model")
  c.distributed = False           # jax.distributed.initialize() on multi-host pods (non-semantic)

  c.save = mlc.ConfigDict()       # (non-semantic)
  c.save.export_hf = False        # also write a fake-quantized HF directory (workdir/hf), as the released code

  c.report = mlc.ConfigDict()     # (non-semantic)
  c.report.plots = True

  c.plan = mlc.ConfigDict()       # (non-semantic)
  c.plan.hardware = ""            # "" = the local machine | a preset of qdllm_jax.plan.HARDWARE (e.g. "tpu_v5e_8")
  c.plan.device_memory_gib = 0.0  # override the per-device memory (0 = detect or take the preset's)
  c.plan.host_memory_gib = 0.0    # override the host memory (0 = detect or take the preset's)
  c.plan.check = True             # refuse (ConfigError) a plan that does not fit
  return c
