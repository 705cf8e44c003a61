r"""Generate text with a quantized checkpoint (the launch's WORKDIR/checkpoint, on its packed weights) or an FP
Hugging Face directory.

  python -m qdllm_jax.generate --model runs/tiny/checkpoint --prompt "shift: e x c g =>" --sampler.gen_length=8 \
      --sampler.block_length=8 --sampler.steps=8
  python -m qdllm_jax.generate --model runs/tiny/checkpoint --input prompts.txt --sampler.gen_length=64 \
      --sampler.block_length=32 --sampler.steps=64
  python -m qdllm_jax.generate --model runs/tiny/checkpoint --jsonl --input in.jsonl --output out.jsonl
  echo "Hello" | python -m qdllm_jax.generate --model /ckpt/LLaDA-8B-Instruct --sampler.block_length=32
  python -m qdllm_jax.generate --model /runs/llada8b-instruct-w2/checkpoint --chat    # multi-turn on stdin

Flags:
  --model DIR           quantized checkpoint (qdllm_checkpoint.json) or FP HF directory (config.json + safetensors)
  --prompt TEXT         a prompt (repeatable); without --prompt / --input the prompts are read from stdin
  --input FILE          prompts, one per line ("-" = stdin); with --jsonl one JSON object per line:
                        {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}, other keys kept
  --jsonl               JSONL in and out: each output line is its input object plus "completion" and
                        "completion_tokens", in input order
  --output FILE         write completions there instead of stdout
  --chat                interactive multi-turn chat on stdin (history kept in the chat template; /reset, /exit)
  --chat_template FILE  use this Jinja template (default: the tokenizer files' own)
  --raw                 do not apply the chat template to plain prompts (default: applied when the model has one)
  --seed N              PRNG seed (default 0): the same seed gives the same tokens (batch b draws with
                        fold_in(key(seed), b); chat turn t uses seed + t)
  --batch_size N        prompts decoded together (default 8)
  --dequantize          dequantize every packed weight first (comparison only; the default runs the packed kernels)
  --no_verify           skip the checksum check of a quantized checkpoint (every file against checksums.json and
                        every array against its sha256; on by default)
  --sampler.KEY=VALUE   sampler settings, typed like the family's defaults (qdllm_jax/sampling/settings.py):
                        LLaDA gen_length steps block_length temperature cfg_scale remasking;
                        Dream gen_length steps temperature top_p top_k alg alg_temp eps
The completions go to stdout (or --output); one summary line (tokens, denoising steps, seconds with the compile
time in them, tokens/s excluding compilation, peak device and host memory, kernel path) goes to stderr. Exit
status 0, or 2 on a user error (the message names the fix).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from qdllm_jax import chat_template
from qdllm_jax import engine as engine_lib
from qdllm_jax.cli import split_overrides
from qdllm_jax.errors import ConfigError, QdllmError
from qdllm_jax.models import load_tokenizer
from qdllm_jax.sampling import settings as settings_lib

PROG = "python -m qdllm_jax.generate"


def build_parser(prog: str = PROG, description: str = "") -> argparse.ArgumentParser:
  """The flags shared by generate and serve (model, tokenizer, sampler, dequantize, batch size)."""
  ap = argparse.ArgumentParser(prog=prog, description=description,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="quantized checkpoint dir or FP HF dir")
  ap.add_argument("--chat_template", default=None, help="Jinja chat template file (default: the tokenizer's)")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--dequantize", action="store_true", help="dequantize the packed weights first (comparison)")
  ap.add_argument("--no_verify", action="store_true",
                  help="skip the checksum check of a quantized checkpoint (faster; for one without checksums.json)")
  return ap


def prepare(args, overrides):
  """(kind, ModelConfig, tokenizer, sampler settings) from the flags; reads no weights."""
  kind, cfg = engine_lib.inspect_model_dir(args.model)
  tok = load_tokenizer(args.model)
  if args.chat_template:
    chat_template.set_template(tok, args.chat_template)
  settings = settings_lib.apply_overrides(settings_lib.settings_for(cfg), overrides)
  if args.batch_size < 1:
    raise ConfigError(f"--batch_size={args.batch_size}: expected a positive integer")
  return kind, cfg, tok, settings


def _parse(argv):
  ap = build_parser(PROG, __doc__)
  ap.add_argument("--prompt", action="append", default=[])
  ap.add_argument("--input", default=None)
  ap.add_argument("--jsonl", action="store_true")
  ap.add_argument("--output", default=None)
  ap.add_argument("--chat", action="store_true")
  ap.add_argument("--raw", action="store_true")
  ap.add_argument("--seed", type=int, default=0)
  args, rest = ap.parse_known_args(argv)
  return args, split_overrides(rest, "--sampler.", PROG)


def read_records(args, stdin) -> list[dict]:
  """The prompts as records {"prompt": str} or {"messages": [...]} (JSONL: the whole input object)."""
  if args.prompt:
    if args.input is not None:
      raise ConfigError("give prompts with --prompt or with --input, not both")
    return [{"prompt": p} for p in args.prompt]
  if args.input in (None, "-") and hasattr(stdin, "isatty") and stdin.isatty():
    print("reading prompts from stdin, one per line; end with Ctrl-D (or pass --prompt TEXT)", file=sys.stderr)
  src = stdin if args.input in (None, "-") else _open_input(args.input)
  lines = [ln.rstrip("\n") for ln in src]
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    if not args.jsonl:
      records.append({"prompt": line})
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"input line {i + 1}: not JSON ({e.msg}); with --jsonl every line is an object such as "
                        '{"prompt": "..."}') from e
    if not isinstance(rec, dict) or ("prompt" in rec) == ("messages" in rec):
      raise ConfigError(f"input line {i + 1}: expected an object with exactly one of 'prompt' or 'messages'")
    records.append(rec)
  if not records:
    raise ConfigError("no prompt given: pass --prompt TEXT, --input FILE, or prompts on stdin")
  return records


def _open_input(path):
  try:
    with open(path, encoding="utf-8") as f:
      return f.readlines()
  except OSError as e:
    raise ConfigError(f"--input {path!r} cannot be read ({e.strerror}); pass an existing text or JSONL file") from e


def encode_record(tok, rec: dict, raw: bool) -> list[int]:
  """Token ids of one record: messages through the chat template; a prompt through it too when the model has a
  template and raw is False, else as plain text."""
  if "messages" in rec:
    return chat_template.encode_chat(tok, rec["messages"])
  if not isinstance(rec["prompt"], str):
    raise ConfigError(f"prompt: expected a string, got {type(rec['prompt']).__name__}")
  if not raw and chat_template.has_template(tok):
    return chat_template.encode_chat(tok, [{"role": "user", "content": rec["prompt"]}])
  return chat_template.encode_plain(tok, rec["prompt"])


def run_batch(args, overrides, stdin, stdout, stderr) -> None:
  kind, cfg, tok, settings = prepare(args, overrides)
  records = read_records(args, stdin)
  prompts = [encode_record(tok, r, args.raw) for r in records]
  for i, ids in enumerate(prompts):
    try:
      engine_lib.check_context(len(ids), settings, cfg)
    except ConfigError as e:
      raise ConfigError(f"prompt {i + 1}: {e}") from None
  eng = engine_lib.load_engine(args.model, dequantize=args.dequantize, tokenizer=tok, verify=not args.no_verify)
  outs, stats = eng.generate(prompts, settings, seed=args.seed, batch_size=args.batch_size)
  lines = []
  for rec, gen in zip(records, outs):
    ids = eng.completion(gen)
    text = tok.decode(ids, skip_special_tokens=True)
    if args.jsonl:
      lines.append(json.dumps(dict(rec, completion=text, completion_tokens=len(ids)), ensure_ascii=False) + "\n")
    else:
      lines.append(text + "\n" + ("\n" if len(records) > 1 else ""))
  if args.output is None:
    stdout.write("".join(lines))
  else:
    write_atomic(args.output, "".join(lines))
  print(engine_lib.summary_line(stats), file=stderr, flush=True)


def write_atomic(path: str, text: str) -> None:
  """Write `text` to a temporary sibling, then rename it onto `path` (never a half-written file)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise ConfigError(f"--output {path!r} cannot be written ({e.strerror}); choose a writable file path") from e


def run_chat(args, overrides, stdin, stdout, stderr) -> None:
  """Multi-turn chat: each stdin line is a user turn; the history is re-rendered with the template every turn."""
  _, cfg, tok, settings = prepare(args, overrides)
  if not chat_template.has_template(tok):
    raise ConfigError(f"--chat needs a chat template, and {args.model}'s tokenizer has none (a base model); pass "
                      "--chat_template FILE, or use plain prompts without --chat")
  eng = engine_lib.load_engine(args.model, dequantize=args.dequantize, tokenizer=tok, verify=not args.no_verify)
  interactive = hasattr(stdin, "isatty") and stdin.isatty()
  history, turn = [], 0
  print(f"chat with {args.model} ({eng.kernel_path}); /reset clears the history, /exit or EOF ends", file=stderr)
  while True:
    if interactive:
      print("> ", end="", file=stderr, flush=True)
    line = stdin.readline()
    if not line or line.strip() == "/exit":
      return
    line = line.strip()
    if not line:
      continue
    if line == "/reset":
      history = []
      print("[history cleared]", file=stderr)
      continue
    ids = chat_template.encode_chat(tok, history + [{"role": "user", "content": line}])
    try:
      engine_lib.check_context(len(ids), settings, cfg)
    except ConfigError as e:
      print(f"error: {e}; /reset starts a new conversation", file=stderr, flush=True)
      continue
    outs, stats = eng.generate([ids], settings, seed=args.seed + turn, batch_size=1)
    reply = eng.completion_text(outs[0])
    history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    turn += 1
    print(reply, file=stdout, flush=True)
    print(engine_lib.summary_line(stats), file=stderr, flush=True)


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
  """Run the CLI; returns the exit status (0, or 2 on a user error)."""
  stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
  try:
    args, overrides = _parse(sys.argv[1:] if argv is None else list(argv))
    (run_chat if args.chat else run_batch)(args, overrides, stdin, stdout, stderr)
    return 0
  except QdllmError as e:
    print(f"error ({type(e).__name__}): {e}", file=stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
