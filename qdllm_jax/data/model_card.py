"""The model card (README.md) of the shipped tiny LLaDA, written from the training summary."""
from __future__ import annotations

import os

from qdllm_jax.data import corpus, sequences
from qdllm_jax.data.tokenizer import load_tokenizer
from qdllm_jax.models.hf_checkpoint import load_pretrained

_TEMPLATE = """# tiny-llada: a {params_m:.2f} M-parameter masked-diffusion LM in the exact LLaDA format

The model every quantization method of qdllm-jax is measured on when no hub checkpoint can be reached.
It is a LLaDA-8B architecture (`model_type` "llada", `LLaDAModelLM` tensor names, SwiGLU, RMSNorm,
half-split RoPE with theta 500000, bidirectional attention, untied head) scaled down with
`llada_config(LLADA_8B, **overrides)`:

| field | value |
|---|---|
| d_model / n_layers / n_heads (head_dim) | {d_model} / {n_layers} / {n_heads} ({head_dim}) |
| mlp_hidden_size | {mlp} (`ff_out` has {mlp} input columns) |
| vocab (= embedding_size) | {vocab} |
| special ids | `<|endoftext|>` {eos} (EOS = pad), `<|bos|>` {bos}, `<|mdm_mask|>` {mask} |
| max_sequence_length | {max_len} |
| weights | float32 safetensors, {size_mb:.1f} MB |

Load it with `qdllm_jax.models.hf_checkpoint.load_pretrained("qdllm_jax/shipped/tiny-llada")` and the tokenizer with
`transformers.AutoTokenizer.from_pretrained("qdllm_jax/shipped/tiny-llada", local_files_only=True)`.

## Reproduce

```
{command}
```
seed {seed}, {steps} steps in {n_phases}, {train_min:.1f} min of training ({total_min:.1f} min in all) on a shared
2-core CPU (jax {jax_version}).{resumed}

The run is a pure function of the seed (keys `fold_in(PRNGKey(seed), step)`, host batches
`default_rng([seed, step])`); bit-exactness across machines is not promised (XLA CPU reductions).

## Data

* Corpus: {n_train_tok} training tokens of King James Version chapters (`qdllm_jax/shipped/corpus/kjv.txt`, public domain,
  see `qdllm_jax/shipped/corpus/SOURCE.md`); a chapter is held out iff sha256("kjv:" + title) mod 20 == 0.
  Documents are packed as `[BOS] text [EOS]`, and training reads random windows of {seq_len} tokens.
* Tokenizer: byte-level BPE (`tokenizers`), trained on the train chapters + 20000 training-pool task strings.
* Tasks (`qdllm_jax/data/tasks.py`): generation `shift` (4 letters, each to its successor) and `increment`
  (4 digits, each + 1 mod 10),
  and multiple choice `max` (largest of 4 digits), `analogy` ("a -> b , p ->": successor letter), and `odd` (odd one out).
  An instance is reserved for evaluation iff sha256(family:key) mod 5 == 0; training never sees those instances.
  The fixed eval sets are in `qdllm_jax/data/eval_sets/{{gen,mc}}.jsonl`. Task rows are drawn 2/3 generation and
  1/3 multiple choice (`TRAIN_FAMILIES` in the script): the MC families are learnt in a few hundred steps,
  and the generation ones need many more examples. Reversing and sorting 3-5 items (`tasks.EXTRA_GEN_FAMILIES`)
  reached only 0-5 % exact match after 600-700 steps of this budget, so the shipped model does not train on them.

## Objective

Training runs in phases (`trainer.Phase`); every step of a phase adds two losses.
(1) LLaDA pretraining on the phase's corpus windows: t ~ U(0,1) per sequence, p = (1 - 1e-3) t + 1e-3,
each token masked with probability p, and `sum_masked CE / p / (B L)`. (2) LLaDA SFT on the phase's task rows
`[BOS] prompt answer`, times the phase's task weight. The prompt is never masked. For generation the answer
region is the answer plus EOS fill to 8 tokens. For multiple choice the region is the correct choice only. The
loss is `mean_b sum_masked CE / p / |answer_b|`. Padding keys are hidden, so a padded row computes exactly the
unpadded sequence.

| phase | steps | corpus windows / step | task rows / step | task weight |
|---|---|---|---|---|
{phase_rows}

{phase_note}

Optimizer: AdamW (b1 {b1}, b2 {b2}, wd {wd} on matrices), peak lr {lr}, {warmup} warmup steps, cosine decay to
{min_lr_ratio} x peak, global-norm clip {clip}; each phase starts a fresh optimizer state and schedule.

## Metrics (float32 model as shipped)

| metric | value |
|---|---|
| final training loss (last {log_every} steps: total / pretrain / SFT) | {loss:.4f} / {l_pre:.4f} / {l_sft:.4f} |
| held-out corpus L_pre (MC NLL bound, nats/token) | {held:.4f} |
{gen_rows}
{mc_rows}

{unigram_text}

Generation runs the LLaDA sampler with low-confidence remasking, temperature 0, `gen_length = steps = block_length = 8`.
The prompt is `[BOS] prompt`. The decoded text up to the first EOS, stripped, must equal the answer exactly.
Multiple choice takes the argmax over the choices of the LLaDA conditional log-likelihood of `choice | [BOS] prompt`.
Every choice is one token, so one Monte-Carlo sample is exact. Scorer: `qdllm_jax/eval/suite.py` (the `tiny` protocol).

## Training curve

| step | loss | pretrain | SFT | elapsed s |
|---|---|---|---|---|
{curve}
"""


def _rows(kind: str, d: dict) -> str:
  return "\n".join(f"| {kind} `{k}` | {100 * v:.1f} % |" for k, v in d.items())


def unigram_entropy(tok) -> float:
  """H = -sum_v f_v log f_v (nats) of the token frequencies f of the training stream (corpus.load_splits)."""
  import numpy as np
  f = np.bincount(sequences.encode_stream(tok, corpus.load_splits()["train"]))
  f = f[f > 0] / f.sum()
  return float(-(f * np.log(f)).sum())


def _unigram_text(held: float, unigram: float) -> str:
  if held > unigram - 0.1:
    return (f"The held-out L_pre is close to the unigram entropy of the training token stream ({unigram:.2f} nats), "
            "so the corpus is learnt at\nroughly unigram level in this budget. Compare quantizers with the task "
            "metrics. Corpus perplexity moves little here.")
  return (f"The held-out L_pre is {unigram - held:.2f} nats/token below the unigram entropy of the training token "
          f"stream ({unigram:.2f} nats):\nthe model predicts masked tokens from their context, so quantization "
          "damage shows in the corpus ELBO as well as in the tasks.")


def _phase_note(phases: list) -> str:
  if len(phases) < 2:
    return ""
  return ("With task rows at full weight the corpus objective stays on a unigram plateau; docs/evaluation.md "
          "measures recipes\nwith a pure-pretraining phase and with a continuation phase on more corpus.")


def write(out_dir: str, summary: dict, history: list[dict]) -> str:
  """Render README.md into out_dir from the summary dict of scripts/make_tiny_model.py; returns its path."""
  import jax
  cfg = load_pretrained(out_dir).config
  tc, fl = dict(summary["train_config"]), summary["final_loss"]
  if "phases" not in tc:  # a summary written before runs had phases: one phase
    tc["phases"] = [dict(steps=tc["steps"], batch=tc["batch"], task_batch=tc["task_batch"],
                         task_weight=tc.get("task_weight", 1.0))]
  stride = max(1, len(history) // 16)
  curve = "\n".join(f"| {h['step']} | {h['loss']:.4f} | {h['l_pre']:.4f} | {h['l_sft']:.4f} | {h['elapsed']:.0f} |"
                    for i, h in enumerate(history) if i % stride == 0 or i == len(history) - 1)
  text = _TEMPLATE.format(
      params_m=summary["num_params"] / 1e6, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
      head_dim=cfg.head_dim, mlp=cfg.mlp_hidden, vocab=cfg.vocab_size, eos=cfg.eos_id, bos=cfg.bos_id,
      mask=cfg.mask_id, max_len=cfg.max_seq_len,
      size_mb=os.path.getsize(os.path.join(out_dir, "model.safetensors")) / 1e6, command=summary.get("full_command", summary["command"]),
      seed=summary["seed"], train_min=summary["train_seconds"] / 60,
      total_min=summary["total_seconds"] / 60, jax_version=jax.__version__, n_train_tok=summary["corpus_train_tokens"],
      seq_len=tc["seq_len"], b1=tc["b1"], b2=tc["b2"],
      wd=tc["weight_decay"], lr=tc["lr"], warmup=tc["warmup"], min_lr_ratio=tc["min_lr_ratio"], clip=tc["clip"],
      log_every=tc["log_every"], loss=fl["loss"], l_pre=fl["l_pre"], l_sft=fl["l_sft"],
      held=summary["heldout_pretrain_loss"], gen_rows=_rows("generation exact match", summary["gen_exact_match"]),
      mc_rows=_rows("multiple-choice accuracy", summary["mc_accuracy"]), curve=curve,
      unigram_text=_unigram_text(summary["heldout_pretrain_loss"], unigram_entropy(load_tokenizer(out_dir))),
      phase_rows="\n".join(f"| {i} | {p['steps']} | {p['batch']} | {p['task_batch']} | {p['task_weight']} |"
                            for i, p in enumerate(tc["phases"])),
      phase_note=_phase_note(tc["phases"]), steps=sum(p["steps"] for p in tc["phases"]), n_phases=f"{len(tc['phases'])} phase" + ("s" if len(tc["phases"]) > 1 else ""),
      resumed=(f" These weights were made by `{summary['command']}`: it resumed at phase\n"
               f"{summary['start_phase']} from `{summary['init_from']}`, the weights the earlier phases of the command "
               "above produce (the previous shipped model),\nso the times are of the resumed phases only."
               if summary.get("start_phase") else ""))
  path = os.path.join(out_dir, "README.md")
  with open(path, "w") as f:
    f.write(text)
  return path
