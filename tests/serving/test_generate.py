"""`python -m qdllm_jax.generate` against the samplers called directly on `load_quantized` (same seed, same
tokens), JSONL order, chat template equality with the tokenizer's own, --chat history, and the user errors."""
import io
import json
import os
import shutil

import jax
import numpy as np
from serving_common import FLAGS, SHIPPED, direct, random_params, same_length_prompts, text_of

from qdllm_jax import chat_template, generate
from qdllm_jax.checkpoint import load_quantized
from qdllm_jax.engine import load_engine, packed_weights
from qdllm_jax.models import load_pretrained, load_tokenizer, save_pretrained
from qdllm_jax.models.dream import DREAM_7B, dream_config
from qdllm_jax.sampling import dream_generate


def _run(argv, stdin=""):
  out, err = io.StringIO(), io.StringIO()
  rc = generate.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
  return rc, out.getvalue(), err.getvalue()


def test_generate_equals_the_sampler_on_load_quantized_and_never_dequantizes(q_dir, monkeypatch):
  tok = load_tokenizer(q_dir)
  prompt = same_length_prompts(tok, 1)[0]
  ids = tok(prompt)["input_ids"]
  want = direct(q_dir, [ids], seed=3, temperature=0.8)[0]

  def refuse(*a, **k):
    raise AssertionError("a packed weight was dequantized whole")
  for cls in {type(w) for w in packed_weights(load_quantized(q_dir).params)}:  # every packed format's class
    monkeypatch.setattr(cls, "dequantize", refuse)
  rc, out, err = _run(["--model", q_dir, "--prompt", prompt, "--raw", "--seed", "3", "--jsonl",
                       "--sampler.temperature=0.8"] + FLAGS)
  assert rc == 0, err
  rec = json.loads(out)
  assert rec["completion"] == text_of(tok, want) and rec["prompt"] == prompt
  summary = err.strip().splitlines()[-1]
  assert "packed kernels: xla (binary_planes x4, int2 x1, int3 x1, int4 x1" in summary
  assert "tokens 8  denoising steps 8" in summary and "tokens/s" in summary and "peak host memory" in summary


def test_jsonl_batch_in_order_each_row_its_own_key(q_dir, tmp_path):
  tok = load_tokenizer(q_dir)
  prompts = same_length_prompts(tok, 3)
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
  dst = tmp_path / "out.jsonl"
  rc, out, err = _run(["--model", q_dir, "--input", str(src), "--jsonl", "--raw", "--batch_size", "1", "--seed", "5",
                       "--output", str(dst), "--sampler.temperature=0.8"] + FLAGS)
  assert rc == 0 and out == "", err
  assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary file left
  recs = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [r["id"] for r in recs] == ["r0", "r1", "r2"] and [r["prompt"] for r in recs] == prompts
  for i, (r, p) in enumerate(zip(recs, prompts)):  # batch i of size 1 draws with fold_in(key(5), i)
    assert r["completion"] == text_of(tok, direct(q_dir, [tok(p)["input_ids"]], seed=5, batch=i,
                                                  temperature=0.8)[0]), i


def test_chat_template_is_applied_as_the_tokenizer_does(tok_dir):
  tok = load_tokenizer(tok_dir)
  msgs = [{"role": "user", "content": "Who made the light?"}, {"role": "assistant", "content": " God "},
          {"role": "user", "content": "And then?"}]
  want_text = ("<|bos|><|start_header_id|>user<|end_header_id|>\n\nWho made the light?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nGod<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnd then?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert chat_template.render_chat(tok, msgs) == want_text
  ref = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
  ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
  ids = chat_template.encode_chat(tok, msgs)
  assert ids == list(ref) and ids.count(tok.bos_token_id) == 1


def test_chat_mode_keeps_the_history_in_the_template(q_dir):
  tok = load_tokenizer(q_dir)
  turns = ["Who made the light?", "And the water?"]
  rc, out, err = _run(["--model", q_dir, "--chat", "--seed", "7", "--sampler.temperature=0.8"] + FLAGS,
                      stdin="\n".join(turns) + "\n/exit\n")
  assert rc == 0, err
  history, replies = [], []
  for t, line in enumerate(turns):  # turn t: seed 7 + t, the whole history rendered by the tokenizer
    history.append({"role": "user", "content": line})
    ids = tok.apply_chat_template(history, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    replies.append(text_of(tok, direct(q_dir, [ids], seed=7 + t, temperature=0.8)[0]))
    history.append({"role": "assistant", "content": replies[-1]})
  assert out == "".join(r + "\n" for r in replies)
  assert err.count("[summary]") == 2


def _cli_error(argv, stdin=""):
  rc, out, err = _run(argv, stdin)
  assert rc == 2 and out == "", (rc, out, err)
  return err


def test_bad_inputs_exit_2_naming_the_fix(q_dir, fp_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "nor config.json" in _cli_error(["--model", str(empty), "--prompt", "x"])
  workdir = os.path.dirname(q_dir)
  assert f"--model {q_dir}" in _cli_error(["--model", workdir, "--prompt", "x"])
  notok = tmp_path / "fp_no_tok"
  shutil.copytree(fp_dir, notok)
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    os.remove(notok / f)
  assert "no tokenizer files" in _cli_error(["--model", str(notok), "--prompt", "x"])
  trunc = tmp_path / "trunc"
  shutil.copytree(q_dir, trunc)
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(trunc / "arrays") for f in fs), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  err = _cli_error(["--model", str(trunc), "--prompt", "x"] + FLAGS)
  assert "CheckpointError" in err and str(trunc) in err
  long_prompt = " ".join(["light"] * 300)
  err = _cli_error(["--model", q_dir, "--prompt", long_prompt, "--raw"] + FLAGS)
  assert "context of 256 tokens" in err and "shorten the prompt to at most 248 tokens" in err
  assert "block_length" in _cli_error(["--model", q_dir, "--prompt", "x", "--sampler.gen_length=6"])
  assert "is a dream setting" in _cli_error(["--model", q_dir, "--prompt", "x", "--sampler.top_p=0.9"])
  err = _cli_error(["--model", q_dir, "--prompt", "x", "--sampler.foo=1"])
  assert "--sampler.foo: unknown key" in err and "'steps'" in err and "family" not in err
  err = _cli_error(["--model", q_dir, "--prompt", "x", "--sampler.steps=abc"])
  assert "--sampler.steps='abc': expected a int" in err
  assert "is not a file" in _cli_error(["--model", fp_dir, "--chat", "--chat_template", str(empty)])
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # a base model's tokenizer
    shutil.copy(os.path.join(SHIPPED, f), notok / f)
  assert "has none (a base model); pass --chat_template FILE" in _cli_error(["--model", str(notok), "--chat"])
  assert "no prompt given" in _cli_error(["--model", q_dir], stdin="\n")


def test_damaged_checkpoint_files_name_the_fix(q_dir, fp_dir, tmp_path):
  """A truncated sidecar, an empty config.json, a checkpoint without checksums.json: each error says what to do."""
  cut = tmp_path / "cut"
  shutil.copytree(q_dir, cut)
  side = cut / "qdllm_checkpoint.json"
  side.write_bytes(side.read_bytes()[:40])
  err = _cli_error(["--model", str(cut), "--prompt", "x"])
  assert "qdllm_checkpoint.json: cannot read the checkpoint sidecar" in err and "copy the directory again" in err
  fp = tmp_path / "fp"
  shutil.copytree(fp_dir, fp)
  (fp / "config.json").write_text("")
  assert "download the model directory again" in _cli_error(["--model", str(fp), "--prompt", "x"])
  bare = tmp_path / "bare"
  shutil.copytree(q_dir, bare)
  os.remove(bare / "checksums.json")
  err = _cli_error(["--model", str(bare), "--prompt", "x"] + FLAGS)
  assert "no checksums.json" in err and "--no_verify" in err
  assert len(packed_weights(load_engine(str(bare), verify=False).model.params)) == 7


def test_dequantize_is_explicit_and_matches_the_packed_logits(q_dir):
  packed, dense = load_engine(q_dir), load_engine(q_dir, dequantize=True)
  assert len(packed_weights(packed.model.params)) == 7 and not packed_weights(dense.model.params)
  assert dense.kernel_path.startswith("dense (whole model dequantized")
  ids = np.arange(3, 40, dtype=np.int32)[None]
  np.testing.assert_allclose(np.asarray(packed.model(ids)), np.asarray(dense.model(ids)), rtol=0, atol=2e-4)


def test_a_dream_fp_directory_uses_dreams_sampler_and_settings(tok_dir, tmp_path):
  cfg = dream_config(DREAM_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048, mask_token_id=2, pad_token_id=0, eos_token_id=0,
                     bos_token_id=1, max_position_embeddings=256, torch_dtype="float32")
  d = save_pretrained(random_params(cfg, np.random.default_rng(1)), cfg, str(tmp_path / "dream"),
                      tokenizer_from=tok_dir)
  tok = load_tokenizer(d)
  prompt = same_length_prompts(tok, 1)[0]
  rc, out, err = _run(["--model", d, "--prompt", prompt, "--raw", "--jsonl", "--seed", "2", "--sampler.gen_length=8",
                       "--sampler.steps=8", "--sampler.temperature=0.5", "--sampler.top_p=0.9"])
  assert rc == 0, err
  ids = np.asarray([tok(prompt)["input_ids"]], np.int32)
  want = dream_generate(load_pretrained(d), ids, mask_id=2, max_new_tokens=8, steps=8, temperature=0.5, top_p=0.9,
                        key=jax.random.fold_in(jax.random.key(2), 0))
  assert json.loads(out)["completion"] == text_of(tok, np.asarray(want)[0, ids.shape[1]:])
  assert "dense (hf checkpoint)" in err
