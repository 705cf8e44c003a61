"""Evaluation protocols as data: every setting a score depends on, in frozen dataclasses.

  get_protocol("tiny")            -> the shipped tiny LLaDA on its shipped tasks (suite.evaluate)
  get_protocol("tiny_smoke")      -> a 16-per-family subset of `tiny` for quick checks
  get_protocol("tiny_full")       -> `tiny` with every held-out ELBO window and twice the Monte-Carlo samples
  get_protocol("minilm_fidelity") -> an encoder against its FP source (eval/fidelity.py) on held-out sentences
  get_protocol("quant_dllm_llada" | "quant_dllm_dream" | "qdlm_llada" | "qdlm_dream")
                                  -> the papers' settings (arXiv 2510.03274 and 2508.14896 experimental setups;
                                     LLaDA eval_llada.py); run through lm_eval_adapter on local task data

Task names of the real-benchmark protocols are lm-eval (0.4.x) task or group names; templates are those
of the lm-eval task YAMLs (quoted where short). Settings the papers do not print are marked in `notes`.
A protocol's `card()` is a JSON-able dict; `suite.evaluate` returns it with the scores.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from qdllm_jax.data.sequences import GEN_LEN
from qdllm_jax.data.tasks import GEN_FAMILIES, MC_FAMILIES
from qdllm_jax.errors import ConfigError
from qdllm_jax.models.families import FAMILIES

SAMPLERS = ("llada", "dream")  # the masked-diffusion samplers (sampling/): what a family's `sampler` names
# families scored by fidelity protocols (eval/fidelity.py: quantized encoder vs FP source): `Family.encoder`
ENCODERS = tuple(name for name, fam in FAMILIES.items() if fam.encoder)
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclasses.dataclass(frozen=True)
class PerplexitySpec:
  """Held-out ELBO perplexity: `n_windows` evenly spaced, non-overlapping windows of `window` tokens of the
  held-out corpus stream ([BOS] doc [EOS] ...; None = all windows), each scored with `n_mc` LLaDA-form
  samples in stratified batches of `mc_batch` (elbo.elbo_nll), with the all-masked control variate."""
  corpus_split: str = "heldout"
  window: int = 128
  n_windows: Optional[int] = 64
  n_mc: int = 8
  mc_batch: int = 8
  control_variate: bool = True


@dataclasses.dataclass(frozen=True)
class FidelitySpec:
  """Encoder fidelity (eval/fidelity.py): `n_sentences` held-out verses (>= min_words words, none occurring in a
  training chapter of the shipped corpus, which is all calibration reads from it), tokenized with the model's own
  tokenizer and truncated to max_tokens; hidden-state error on plain inputs and on inputs masked at each of
  `mask_rates`; sentence-embedding cosine and similarity-structure correlations (jackknife over `jackknife_groups`
  groups of sentences); `batch` sentences per forward."""
  corpus_split: str = "heldout"
  n_sentences: int = 256
  min_words: int = 8
  max_tokens: int = 64
  mask_rates: tuple = (0.15, 0.5, 0.9)
  jackknife_groups: int = 32
  batch: int = 64


@dataclasses.dataclass(frozen=True)
class LikelihoodTask:
  """A multiple-choice task scored by the MC conditional log-likelihood of each choice (argmax wins).

  mc_num / mc_batch: the estimator's total samples and batch (b); cfg_scale: LLaDA's unsupervised CFG.
  metric: what the paper reports ("acc" or "acc_norm"); template: the prompt format."""
  name: str
  num_fewshot: int = 0
  mc_num: int = 128
  mc_batch: int = 8
  cfg_scale: float = 0.0
  metric: str = "acc"
  template: str = "lm-eval default"


@dataclasses.dataclass(frozen=True)
class GenerationTask:
  """A generation task scored on the sampler's output.

  sampler "llada": gen_length, steps, block_length, temperature, cfg_scale, remasking (llada_generate).
  sampler "dream": gen_length = max_new_tokens, steps = diffusion steps, temperature, top_p, alg
  (dream_generate; block_length must be None). until: stop strings applied to the decoded text.
  answer_nll_mc > 0 (shipped tasks only): also score the reference answer region (answer + EOS fill to
  gen_length) by its conditional ELBO (elbo.elbo_nll, answer_nll_mc samples in batches of answer_nll_batch)."""
  name: str
  num_fewshot: int = 0
  sampler: str = "llada"
  gen_length: int = 128
  steps: int = 128
  block_length: Optional[int] = 128
  temperature: float = 0.0
  cfg_scale: float = 0.0
  remasking: Optional[str] = "low_confidence"
  top_p: Optional[float] = None
  alg: Optional[str] = None
  until: tuple = ()
  metric: str = "exact_match"
  template: str = "lm-eval default"
  answer_nll_mc: int = 0
  answer_nll_batch: int = 8


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A named evaluation protocol. data: "shipped" (suite.evaluate on qdllm_jax/data tasks) or "lm_eval"
  (lm_eval_adapter on user-supplied local task data). limit: examples per family (None = all)."""
  name: str
  description: str
  arch: str
  data: str
  likelihood: tuple = ()
  generation: tuple = ()
  perplexity: Optional[PerplexitySpec] = None
  fidelity: Optional[FidelitySpec] = None
  add_bos_token: bool = True
  limit: Optional[int] = None
  source: str = ""
  notes: tuple = ()

  def card(self) -> dict:
    """Every setting as a JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(self)

  @property
  def task_names(self) -> set:
    """Names of the protocol's likelihood and generation tasks."""
    return {t.name for t in self.likelihood + self.generation}

  def validate(self) -> "Protocol":
    """Raise ConfigError on inconsistent settings; returns self."""
    _check(self.arch in FAMILIES, self, f"arch={self.arch!r}, expected a model family of {tuple(FAMILIES)}")
    fam, f = FAMILIES[self.arch], self.fidelity
    _check(fam.encoder == (f is not None), self, "an encoder protocol has a fidelity spec and only it")
    _check(fam.encoder or fam.sampler in SAMPLERS, self, f"the {fam.name} family's sampler {fam.sampler!r} is "
           f"not one of {SAMPLERS}")
    if f is not None:
      _check(not (self.likelihood or self.generation or self.perplexity) and self.data == "shipped", self,
             "an encoder protocol scores fidelity on the shipped corpus only (no tasks, no perplexity)")
      _check(f.n_sentences >= 2 and f.min_words >= 1 and f.max_tokens >= 4 and f.batch >= 1, self,
             f"fidelity: n_sentences={f.n_sentences} >= 2, min_words >= 1, max_tokens >= 4, batch >= 1 expected")
      _check(all(0 < t <= 1 for t in f.mask_rates) and 2 <= f.jackknife_groups <= f.n_sentences, self,
             f"fidelity: mask_rates {f.mask_rates} in (0, 1] and 2 <= jackknife_groups <= n_sentences expected")
      _check(f.corpus_split in ("heldout", "train"), self, f"fidelity: corpus_split={f.corpus_split!r}")
    _check(self.data in ("shipped", "lm_eval"), self, f"data={self.data!r}, expected 'shipped' or 'lm_eval'")
    _check(self.limit is None or self.limit >= 1, self, f"limit={self.limit}, expected None or >= 1")
    names = [t.name for t in self.likelihood + self.generation]
    _check(len(names) == len(set(names)), self, f"duplicate task names in {names}")
    for t in self.likelihood:
      _check(isinstance(t, LikelihoodTask), self, f"likelihood entry {t!r} is not a LikelihoodTask")
      _check(t.mc_num >= 1 and t.mc_batch >= 1 and t.mc_num % t.mc_batch == 0, self,
             f"{t.name}: mc_num={t.mc_num} must be a positive multiple of mc_batch={t.mc_batch}")
      _check(t.num_fewshot >= 0 and t.cfg_scale >= 0, self, f"{t.name}: negative num_fewshot or cfg_scale")
      _check(t.metric in ("acc", "acc_norm"), self, f"{t.name}: metric={t.metric!r}, expected acc or acc_norm")
    for t in self.generation:
      _check(isinstance(t, GenerationTask), self, f"generation entry {t!r} is not a GenerationTask")
      _check(t.sampler == fam.sampler, self, f"{t.name}: sampler {t.sampler!r} differs from the {self.arch} "
             f"family's {fam.sampler!r}")
      _check(t.gen_length >= 1 and t.steps >= 1 and t.temperature >= 0, self,
             f"{t.name}: gen_length, steps must be >= 1 and temperature >= 0")
      _check(t.answer_nll_mc >= 0 and t.answer_nll_batch >= 1 and t.answer_nll_mc % t.answer_nll_batch == 0, self,
             f"{t.name}: answer_nll_mc={t.answer_nll_mc} must be a multiple of answer_nll_batch={t.answer_nll_batch}")
      _check(t.answer_nll_mc == 0 or self.data == "shipped", self, f"{t.name}: answer_nll needs shipped references")
      if t.sampler == "llada":
        _check(t.block_length is not None and t.gen_length % t.block_length == 0, self,
               f"{t.name}: gen_length={t.gen_length} is not a multiple of block_length={t.block_length}")
        nb = t.gen_length // t.block_length
        _check(t.steps % nb == 0, self, f"{t.name}: steps={t.steps} not a multiple of the {nb} blocks")
        _check(t.remasking in ("low_confidence", "random"), self, f"{t.name}: remasking={t.remasking!r}")
      else:
        _check(t.block_length is None, self, f"{t.name}: Dream decodes the whole canvas; block_length must be None")
        _check(t.alg in DREAM_ALGS, self, f"{t.name}: alg={t.alg!r}, expected one of {DREAM_ALGS}")
        _check(t.top_p is None or 0 < t.top_p <= 1, self, f"{t.name}: top_p={t.top_p} not in (0, 1]")
        _check(t.remasking is None, self, f"{t.name}: remasking is a LLaDA setting; use alg for Dream")
    p = self.perplexity
    if p is not None:
      _check(p.window >= 2 and p.n_mc >= 1 and p.mc_batch >= 1 and p.n_mc % p.mc_batch == 0, self,
             f"perplexity: window={p.window} must be >= 2 and n_mc={p.n_mc} a multiple of mc_batch={p.mc_batch}")
      _check(p.window % p.mc_batch == 0, self, f"perplexity: mc_batch={p.mc_batch} must divide window={p.window} "
             "(then every stratified count l_j is exactly uniform on 1..window)")
      _check(p.n_windows is None or p.n_windows >= 1, self, f"perplexity: n_windows={p.n_windows}")
      _check(p.corpus_split in ("heldout", "train"), self, f"perplexity: corpus_split={p.corpus_split!r}")
    return self


def _check(ok, proto, msg):
  if not ok:
    raise ConfigError(f"protocol {proto.name!r}: {msg}; fix the protocol definition.")


# ---------------------------------------------------------------- the shipped tiny LLaDA
_TINY_TEMPLATE_MC = "[BOS] prompt | choice (windows.mc_ids); every choice is one token"
_TINY_TEMPLATE_GEN = "[BOS] prompt, then GEN_LEN masks (windows.gen_prompt_ids); answer = text before the first EOS"
_TINY_MC = tuple(LikelihoodTask(f, 0, mc_num=1, mc_batch=1, template=_TINY_TEMPLATE_MC)
                 for f in MC_FAMILIES)
_TINY_GEN = tuple(GenerationTask(f, 0, "llada", gen_length=GEN_LEN, steps=GEN_LEN, block_length=GEN_LEN,
                                 template=_TINY_TEMPLATE_GEN, answer_nll_mc=GEN_LEN, answer_nll_batch=GEN_LEN)
                  for f in GEN_FAMILIES)
_TINY_NOTES = (
    "mc_num 1: every shipped choice is a single token, for which the LLaDA estimator is exact (l = 1 always "
    "masks it), so more samples repeat the same number.",
    "generation: left-padded batches with attention_mask (the LLaDA reference's batching); positions shift "
    "by the pad count, which RoPE's relative form leaves unchanged up to float rounding.",
    "perplexity: 64 windows x n_mc 16 keep the suite under 60 s; quantized-vs-FP changes are judged by the paired "
    "statistics (eval/paired.py: same windows, items and random draws), not by two seeds agreeing "
    "(docs/evaluation.md); `tiny_full` scores every held-out window with twice the samples.",
    "answer NLL: b = n_mc = GEN_LEN, so one stratified batch masks each count 1..GEN_LEN exactly once.",
)
TINY = Protocol(
    name="tiny", description="Shipped tiny LLaDA: KJV held-out ELBO perplexity, 3 MC and 2 generation families",
    arch="llada", data="shipped", likelihood=_TINY_MC, generation=_TINY_GEN,
    perplexity=PerplexitySpec(window=128, n_windows=64, n_mc=16, mc_batch=8),
    add_bos_token=True, source="qdllm_jax/data (tasks.py, eval_sets/*.jsonl, corpus.py)", notes=_TINY_NOTES)
TINY_FULL = dataclasses.replace(
    TINY, name="tiny_full", description="`tiny` with every held-out perplexity window (274) at n_mc 32 (8.6x the "
    "ELBO rows; the task sets are already complete in `tiny`)",
    perplexity=PerplexitySpec(window=128, n_windows=None, n_mc=32, mc_batch=8))
TINY_SMOKE = dataclasses.replace(
    TINY, name="tiny_smoke", description="16 examples per family and 4 perplexity windows of `tiny`",
    perplexity=PerplexitySpec(window=128, n_windows=4, n_mc=8, mc_batch=8), limit=16)

# ---------------------------------------------------------------- the papers' settings (lm-eval task names)
_ARC_T = 'Question: {{question}}\\nAnswer: (choices: the answer texts)'
_PIQA_T = 'Question: {{goal}}\\nAnswer: (choices: sol1, sol2)'
_MMLU_T = '{{question}}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: (choices " A".." D": one token)'
_WINO_T = "partial-sentence scoring (lm-eval winogrande: the option fills the blank in the context)"
_HELLA_T = "{{query}} (lm-eval hellaswag preprocess), choices the endings"


def _general(arch_batch, mmlu_mc, wino_shots, mmlu_batch=None):
  return (LikelihoodTask("mmlu", 5, mc_num=mmlu_mc, mc_batch=mmlu_batch or min(arch_batch, mmlu_mc), template=_MMLU_T),
          LikelihoodTask("winogrande", wino_shots, mc_num=128, mc_batch=arch_batch, template=_WINO_T),
          LikelihoodTask("piqa", 0, mc_num=128, mc_batch=arch_batch, template=_PIQA_T),
          LikelihoodTask("arc_challenge", 0, mc_num=128, mc_batch=arch_batch, template=_ARC_T),
          LikelihoodTask("arc_easy", 0, mc_num=128, mc_batch=arch_batch, template=_ARC_T),
          LikelihoodTask("hellaswag", 0, mc_num=128, mc_batch=arch_batch, template=_HELLA_T))


_BBH_UNTIL = ("</s>", "Q:", "<|im_end|>")
QUANT_DLLM_LLADA = Protocol(
    name="quant_dllm_llada", description="Quant-dLLM Table 1, LLaDA-8B-Base",
    arch="llada", data="lm_eval", likelihood=_general(8, 128, 5),
    generation=(GenerationTask("bbh_zeroshot", 0, "llada", gen_length=1024, steps=1024, block_length=1024,
                               until=_BBH_UNTIL, template="lm-eval bbh_zeroshot ('Q: {{input}}\\nA:')"),),
    add_bos_token=True, source="arXiv 2510.03274; ML-GSAI/LLaDA eval_llada.py --model llada_dist",
    notes=("cfg 0, is_check_greedy False; likelihood batch 8, BBH batch 1.",
           "MMLU choices are single tokens, so mc_num 128 equals the exact value.",
           "add_bos_token: LLaDA's tokenizer prepends BOS when eval_llada.py calls tokenizer(text); unconfirmed."))
QUANT_DLLM_DREAM = Protocol(
    name="quant_dllm_dream", description="Quant-dLLM Table 1, Dream-7B-Base",
    arch="dream", data="lm_eval", likelihood=_general(32, 128, 5),
    generation=(GenerationTask("bbh_zeroshot", 0, "dream", gen_length=512, steps=512, block_length=None,
                               temperature=0.0, top_p=0.95, alg="origin", remasking=None,
                               until=_BBH_UNTIL, template="lm-eval bbh_zeroshot ('Q: {{input}}\\nA:')"),),
    add_bos_token=True, source="arXiv 2510.03274; HKUNLP/Dream eval/eval.py --model dream",
    notes=("Dream likelihood: nll_type mc, log_type ftb, sampling_eps 1e-3, batch 32; EOS appended to answers.",
           "alg is not printed; 'origin' is diffusion_generate's default."))
_LLADA_GEN = (
    GenerationTask("gsm8k", 4, "llada", gen_length=256, steps=256, block_length=32,
                   until=("Question:", "</s>", "<|im_end|>"), template="lm-eval gsm8k 'Question: ..\\nAnswer:'"),
    GenerationTask("minerva_math", 0, "llada", gen_length=256, steps=256, block_length=64,
                   until=("Problem:",), template="lm-eval minerva_math 'Problem:\\n..\\n\\nSolution:'"),
    GenerationTask("humaneval", 0, "llada", gen_length=512, steps=512, block_length=32, metric="pass@1",
                   until=("\nclass", "\ndef", "\n#", "\nif", "\nprint"), template="lm-eval humaneval '{{prompt}}'"),
    GenerationTask("mbpp", 3, "llada", gen_length=512, steps=512, block_length=32, metric="pass@1",
                   until=("[DONE]",), template="lm-eval mbpp '.. Your code should pass these tests: .. [BEGIN]'"))
QDLM_LLADA = Protocol(
    name="qdlm_llada", description="QDLM systematic study (Tables 1-4), LLaDA-8B",
    arch="llada", data="lm_eval", likelihood=_general(8, 1, 0), generation=_LLADA_GEN,
    add_bos_token=True, source="arXiv 2508.14896; FelixMessi/QDLM lm-evaluation-harness llada_dist",
    notes=("temperature 0, cfg 0, low_confidence remasking for every generation task.",
           "likelihood MC batch is not printed; 8 (LLaDA's eval script) is assumed.",
           "code tasks need HF_ALLOW_CODE_EVAL=1 and lm-eval's confirm_run_unsafe_code."))
QDLM_DREAM = Protocol(
    name="qdlm_dream", description="QDLM systematic study, Dream-7B-Base",
    arch="dream", data="lm_eval", likelihood=_general(32, 1, 0),
    generation=tuple(GenerationTask(t.name, t.num_fewshot, "dream", gen_length=128, steps=128, block_length=None,
                                    temperature=0.0, cfg_scale=1.0, top_p=0.95, alg="origin", remasking=None,
                                    until=t.until, metric=t.metric, template=t.template) for t in _LLADA_GEN),
    add_bos_token=True, source="arXiv 2508.14896; FelixMessi/QDLM lm-evaluation-harness dream_base",
    notes=("cfg 1.0 is recorded as printed; dream_generate has no CFG, so the adapter refuses cfg_scale > 0 "
           "unless called with ignore_cfg=True (then it runs without guidance and says so).",
           "diffusion steps are not printed: steps = max_new_tokens = 128 assumed; alg not printed ('origin').",
           "same likelihood protocol as qdlm_llada (128 MC samples, MMLU 1), with Dream's estimator."))

# ---------------------------------------------------------------- encoders (sentence-transformers all-MiniLM-L6-v2)
MINILM_FIDELITY = Protocol(
    name="minilm_fidelity", description="Encoder fidelity to FP on 256 held-out KJV verses: hidden-state error "
    "(plain and [MASK]-ed at 15/50/90 %), sentence-embedding cosine, similarity-structure correlation",
    arch="bert", data="shipped", fidelity=FidelitySpec(), add_bos_token=False,
    source="qdllm_jax/data/corpus.py held-out chapters; the model's tokenizer; eval/fidelity.py",
    notes=("held out: the verses come from the held-out chapters and none equals a verse of a training chapter, "
           "so MCS calibration on the training split never sees them.",
           "masked inputs: round(t n) of each sentence's n non-special tokens -> [MASK] (seeded by the eval seed "
           "and t), the same positions for FP and quantized; [CLS]/[SEP]/[PAD] are never masked.",
           "sentence embedding: mean pooling over non-padding tokens + L2 norm (the model's sentence-transformers "
           "recipe), plain inputs only.",
           "standard errors: paired per sentence for rel_err / emb_cos; delete-a-group jackknife (32 groups) for "
           "the similarity correlations."))

PROTOCOLS = {p.name: p.validate() for p in (TINY, TINY_SMOKE, TINY_FULL, QUANT_DLLM_LLADA, QUANT_DLLM_DREAM,
                                            QDLM_LLADA, QDLM_DREAM, MINILM_FIDELITY)}


def get_protocol(protocol) -> Protocol:
  """A Protocol by name (see PROTOCOLS), or a Protocol instance validated and returned as is."""
  if isinstance(protocol, Protocol):
    return protocol.validate()
  if protocol not in PROTOCOLS:
    raise ConfigError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)} or a Protocol instance.")
  return PROTOCOLS[protocol]
