"""The run config schema: typed frozen dataclasses with their defaults and one line of documentation per key.

This is the single source of the schema. `defaults()` builds the `ml_collections.ConfigDict` that every
`configs/<run>.py` starts from (`qdllm_jax.run_configs.model_config`), `qdllm_jax.config_check.validate` checks a
ConfigDict against it and returns a `RunSpec`, and `describe()` lists every key with its default and meaning
(`python -m qdllm_jax.launch --help_keys`, docs/launch.md). Keys whose field carries `non_semantic` do not
change the quantized checkpoint and are left out of the workdir fingerprint, so changing them never blocks
a resume.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import ml_collections as mlc

from qdllm_jax.quant import methods


def key(default: Any, doc: str, *, non_semantic: bool = False):
  """A schema field: its default (immutable: numbers, strings, tuples, or a section class) and its meaning."""
  meta = {"doc": doc, "non_semantic": non_semantic}
  if isinstance(default, type) and dataclasses.is_dataclass(default):
    return dataclasses.field(default_factory=default, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


def _option(name: str):
  """The default of a method option (quant/method_<name>.py declares it; every method that takes it agrees)."""
  values = {repr(m.options[name]) for m in methods.REGISTRY.values() if name in m.options}
  if len(values) != 1:
    raise AssertionError(f"method option {name!r}: registered defaults {values} (expected one)")
  return next(m.options[name] for m in methods.REGISTRY.values() if name in m.options)


@dataclasses.dataclass(frozen=True)
class CalibSpec:
  source: str = key("c4", "'corpus' (shipped KJV) | 'c4' / 'wikitext2' (HF datasets cache, offline) | a local "
                    ".txt / .jsonl / .json / .json.gz / .parquet file or a directory of them")
  text_field: str = key("text", "JSON field holding the document text")
  nsamples: int = key(128, "calibration windows")
  seqlen: int = key(4096, "tokens per window")
  mcs: bool = key(True, "Masked Calibration Simulation (False: plain unmasked text, as AR PTQ)")
  prefix_ratio: float = key(0.25, "visible prefix gamma of the MCS masking")
  timesteps_per_sample: int = key(1, "MCS timesteps drawn per window")
  seed_x: int = key(0, "mask seed (0 for LLaDA, 100 for Dream in the released code)")
  chunk_size: int = key(8, "sequences per jitted block pass when capturing Hessians")
  offload: str = key("auto", "calibration activations: 'auto' (host if they do not fit) | 'host' | 'device'")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  method: str = key("quant_dllm", "a registered method (qdllm_jax/quant/methods.py): quant_dllm | gptq | rtn")
  bits: int = key(2, "quant_dllm: mean binary planes (1..3); gptq/rtn: 2..8")
  group_size: int = key(128, "column block (quant_dllm, multiple of 32) or quantization group (gptq/rtn; -1 = row)")
  abmp_ratio: float = key(0.05, "0.05 LLaDA, 0.10 Dream; 0 = uniform order (quant_dllm bits=2 only)")
  abmp_scope: str = key("matrix", "'matrix' (released code) | 'global' (one budget across the model)")
  target_bpw: float = key(0.0, "global scope: true bits/weight target (0 = the cost of uniform order 2)")
  dor: bool = key(_option("dor"), "data-aware objective reweighting (salience)")
  outlier_z: float = key(_option("outlier_z"), "DOR: z-score above which a weight counts as salient")
  salient_weight: float = key(_option("salient_weight"), "DOR: weight of a salient entry's squared error")
  rsr_iters: int = key(_option("rsr_iters"), "row/column re-scaling sweeps per block")
  compensation: bool = key(_option("compensation"), "cross-block GPTQ/OBC error compensation")
  comp_mode: str = key(_option("comp_mode"), "'diag': E = (W1 - W^1) / diag(U_bb) (released code) | 'block': "
                       "exact block OBS update E = (W1 - W^1) U_bb^-1 (ours; docs/results.md)")
  z_diag: str = key(_option("z_diag"), "'chol' | 'inv_diag'")
  percdamp: float = key(_option("percdamp"), "Hessian damping as a fraction of its mean diagonal")
  scale_dtype: str = key(_option("scale_dtype"), "stored scales: 'float16' | 'bfloat16' | 'float32'")
  sym: bool = key(_option("sym"), "gptq/rtn: symmetric grid (False = asymmetric min/max, as original GPTQ)")
  act_order: bool = key(_option("act_order"), "gptq only: columns in decreasing Hessian diagonal order")
  module_order: str = key("standard", "'standard' | 'llada_runner'")
  rules: tuple = key((), "((regex, {method, bits, group_size, options} or 'skip'), ...), first match wins; "
                     "empty: every block linear gets the rule made of the keys above")
  embeddings: str = key("fp", "embeddings stay full precision (both papers); only 'fp'")
  head: str = key("fp", "the LM head stays full precision (both papers); only 'fp'")


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
  """How a model is scored (the study's whole eval section; a run's adds fp / quantized)."""
  protocol: str = key("tiny", "named protocol from qdllm_jax.eval.protocols ('' = no evaluation)")
  limit: int = key(0, "examples per task family; 0 = the protocol's own setting")
  ignore_cfg: bool = key(False, "lm-eval protocols with classifier-free guidance are refused unless True: then "
                         "they run without guidance and the report records it")
  include_path: str = key("", "lm-eval protocols: a local directory of task YAMLs (offline task data)")
  task_map: tuple = key((), "lm-eval protocols: ('protocol_task=local_task', ...) to run a local copy instead")


@dataclasses.dataclass(frozen=True)
class EvalSpec(ProtocolSpec):
  fp: bool = key(True, "evaluate the FP model too")
  quantized: bool = key(True, "evaluate the quantized model")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  shape: tuple = key((), "() = auto: all devices, data-parallel unless the model axis is needed to fit")
  axes: tuple = key(("data", "model"), "mesh axis names (qdllm_jax/sharding.py maps logical axes onto them)")


@dataclasses.dataclass(frozen=True)
class SaveSpec:
  export_hf: bool = key(False, "also write a fake-quantized HF directory (workdir/hf), as the released code")


@dataclasses.dataclass(frozen=True)
class ReportSpec:
  plots: bool = key(True, "write the PNG plots beside report.md")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  hardware: str = key("", "'' = the local machine | a preset of qdllm_jax.hardware.HARDWARE (e.g. 'tpu_v5e_8')")
  device_memory_gib: float = key(0.0, "override the per-device memory (0 = detect or take the preset's)")
  host_memory_gib: float = key(0.0, "override the host memory (0 = detect or take the preset's)")
  check: bool = key(True, "refuse (ConfigError) a plan that does not fit")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A validated run config: every key, its default and its meaning are the fields below."""
  model_path: str = key("", "local HF directory (config.json + safetensors + tokenizer)", non_semantic=True)
  model_preset: str = key("", "architecture for --dry_run (no weights): a family's preset (models/families.py "
                          "PRESETS, e.g. 'llada_8b', 'dream_7b')", non_semantic=True)
  dtype: str = key("auto", "params dtype for calibration/eval: 'auto' (as stored) | 'float32' | 'bfloat16'")
  workdir: str = key("", "output directory; --workdir overrides it", non_semantic=True)
  seed: int = key(0, "root of the one key tree: fold_in(key(seed), purpose) for windows/masks/eval")
  calib: CalibSpec = key(CalibSpec, "calibration data")
  quant: QuantSpec = key(QuantSpec, "the quantizer and its options")
  eval: EvalSpec = key(EvalSpec, "evaluation of the FP and quantized models", non_semantic=True)
  mesh: MeshSpec = key(MeshSpec, "device mesh")
  distributed: bool = key(False, "jax.distributed.initialize() on multi-host pods", non_semantic=True)
  save: SaveSpec = key(SaveSpec, "extra outputs", non_semantic=True)
  report: ReportSpec = key(ReportSpec, "the report", non_semantic=True)
  plan: PlanSpec = key(PlanSpec, "the memory and duration plan printed before the run", non_semantic=True)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def semantic_dict(self) -> dict:
    """The fields that determine the quantized checkpoint (fingerprint input)."""
    return {k: v for k, v in self.to_dict().items() if k not in non_semantic_keys(RunSpec)}


# ------------------------------------------------------------------ the PTQ study (python -m qdllm_jax.study)
# The paper's settings (arXiv 2508.14896, experimental setup; FelixMessi/QDLM scripts); configs/study_*.py
# override them.
@dataclasses.dataclass(frozen=True)
class StudyCalibSpec:
  source: str = key("wikitext2", "as calib.source of a run: 'corpus' | 'c4' | 'wikitext2' | a local file")
  text_field: str = key("text", "JSON field holding the document text")
  nsamples: int = key(128, "plain (unmasked) calibration windows, as the study")
  seqlen: int = key(2048, "tokens per window")


@dataclasses.dataclass(frozen=True)
class WeightOnlySpec:
  group_size: int = key(128, "GPTQ / AWQ / RTN group")
  sym: bool = key(False, "symmetric grid")
  percdamp: float = key(0.01, "GPTQ damping")


@dataclasses.dataclass(frozen=True)
class AwqSpec:
  n_grid: int = key(20, "grid points of the per-channel scale search")
  clip: bool = key(True, "AWQ's weight clipping search")


@dataclasses.dataclass(frozen=True)
class SmoothQuantSpec:
  alpha: float = key(0.5, "migration strength")


@dataclasses.dataclass(frozen=True)
class QuaRotSpec:
  w_method: str = key("gptq", "a registered weight method with a symmetric per-channel grid ('gptq' | 'rtn') "
                      "for the rotated weights")
  rotate_ov: bool = key(True, "the online value/output rotation")
  online_down: bool = key(True, "the online Hadamard before the down projection")


@dataclasses.dataclass(frozen=True)
class DuQuantSpec:
  alpha: float = key(0.5, "smoothing strength")
  block_size: int = key(128, "rotation block")
  max_steps: int = key(256, "greedy rotation steps")
  a_clip: float = key(0.9, "activation clip ratio in (0, 1]")
  w_clip: float = key(0.8, "weight clip ratio in (0, 1]")


@dataclasses.dataclass(frozen=True)
class StudySpec:
  """The PTQ study's schema: one calibration set and seed for every entry."""
  model_path: str = key("", "local HF directory")
  dtype: str = key("float32", "'float32' | 'bfloat16'")
  seed: int = key(0, "root of the key tree")
  workdir: str = key("", "output directory; --workdir overrides it")
  entries: tuple = key(("fp", "gptq:w4a16", "gptq:w3a16", "awq:w4a16", "awq:w3a16", "smoothquant:w8a8",
                        "smoothquant:w4a4", "quarot:w8a8", "quarot:w4a4", "duquant:w8a8", "duquant:w4a4"),
                       "'fp' and '<method>:w<bits>a<bits>' rows")
  calib: StudyCalibSpec = key(StudyCalibSpec, "calibration data")
  eval: ProtocolSpec = key(ProtocolSpec, "evaluation")
  weight_only: WeightOnlySpec = key(WeightOnlySpec, "GPTQ / AWQ / RTN settings")
  awq: AwqSpec = key(AwqSpec, "AWQ settings")
  smoothquant: SmoothQuantSpec = key(SmoothQuantSpec, "SmoothQuant settings")
  quarot: QuaRotSpec = key(QuaRotSpec, "QuaRot settings")
  duquant: DuQuantSpec = key(DuQuantSpec, "DuQuant settings")
  plots: bool = key(True, "write the study plot")


# ------------------------------------------------------------ one evaluation (python -m qdllm_jax.eval.suite)
@dataclasses.dataclass(frozen=True)
class SuiteSpec:
  """The settings of the evaluation command (the model directory is its --model flag)."""
  protocol: str = key("tiny", "named protocol from qdllm_jax.eval.protocols")
  seed: int = key(0, "root of the evaluation key tree")
  limit: int = key(0, "examples per task family; 0 = the protocol's own setting")
  out: str = key("", "also write the results JSON here ('' = print only)")
  gumbel: bool = key(False, "also run gumbel_precision_report at temperatures 0.5 and 1.0")


def non_semantic_keys(cls) -> tuple[str, ...]:
  """Top-level fields of `cls` marked non_semantic."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("non_semantic"))


def sections(cls) -> dict[str, type]:
  """{field name: section dataclass} for the fields of `cls` that are sections."""
  return {f.name: f.default_factory for f in dataclasses.fields(cls)
          if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


def defaults(cls=RunSpec) -> mlc.ConfigDict:
  """The ConfigDict of `cls`'s defaults (sections as nested ConfigDicts); what config files start from."""
  c = mlc.ConfigDict()
  subs = sections(cls)
  for f in dataclasses.fields(cls):
    setattr(c, f.name, defaults(subs[f.name]) if f.name in subs else f.default)
  return c


def describe(cls=RunSpec, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
  """(dotted key, default, doc) for every leaf key of `cls`, in schema order."""
  subs = sections(cls)
  for f in dataclasses.fields(cls):
    if f.name in subs:
      yield from describe(subs[f.name], prefix + f.name + ".")
    else:
      yield prefix + f.name, f.default, f.metadata.get("doc", "")


def build(cls, d: dict):
  """`cls` from a nested dict of already checked values (sections built recursively)."""
  subs = sections(cls)
  return cls(**{k: build(subs[k], v) if k in subs else v for k, v in d.items()})
