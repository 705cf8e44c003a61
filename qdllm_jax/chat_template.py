"""Chat prompts of instruct models: messages -> token ids through the template in the tokenizer files.

The template is the one `transformers` reads from the checkpoint (tokenizer_config.json "chat_template",
chat_template.jinja or chat_template.json) or a file given with --chat_template. It is rendered with the
tokenizer's own `apply_chat_template(..., tokenize=False, add_generation_prompt=True)` and the text is encoded
without adding special tokens (the template writes BOS itself), which gives exactly the ids of
`apply_chat_template(..., tokenize=True)`. Instruct checkpoints ship their template: LLaDA-8B-Instruct a
Llama-3-style one (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>), Dream-Instruct Qwen2's <|im_start|>
format; a base model has none, and its prompts are plain text.

  messages = [{"role": "user", "content": "Hi"}]
  ids = encode_chat(tokenizer, messages)       # list[int]
"""
from __future__ import annotations

import os

from qdllm_jax.errors import ConfigError

ROLES = ("system", "user", "assistant")


def has_template(tokenizer) -> bool:
  """Whether the tokenizer files carry a chat template (an instruct model's checkpoint)."""
  return bool(getattr(tokenizer, "chat_template", None))


def set_template(tokenizer, path: str) -> None:
  """Use the Jinja template in file `path` instead of (or in the absence of) the checkpoint's own."""
  if not os.path.isfile(path):
    raise ConfigError(f"--chat_template {path!r} is not a file; expected a Jinja chat template (e.g. the "
                      "'chat_template' string of an instruct model's tokenizer_config.json saved to a file)")
  with open(path, encoding="utf-8") as f:
    tokenizer.chat_template = f.read()


def check_messages(messages, where: str = "messages") -> list[dict]:
  """The messages as [{"role", "content"}] dicts, or ConfigError naming the first malformed entry."""
  if not isinstance(messages, list) or not messages:
    raise ConfigError(f"{where}: expected a non-empty list of {{\"role\": ..., \"content\": ...}} objects, got "
                      f"{type(messages).__name__}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
      raise ConfigError(f"{where}[{i}]: expected an object with exactly 'role' and 'content' (optional 'name'), "
                        f"got {m!r:.80}")
    if m["role"] not in ROLES or not isinstance(m["content"], str):
      raise ConfigError(f"{where}[{i}]: role {m['role']!r} content of type {type(m['content']).__name__}; "
                        f"expected a role in {ROLES} and string content")
    out.append({"role": m["role"], "content": m["content"]})
  if out[-1]["role"] != "user":
    raise ConfigError(f"{where}: the last message has role {out[-1]['role']!r}; expected 'user' (the model "
                      "answers the last user message)")
  return out


def render_chat(tokenizer, messages) -> str:
  """The prompt text: the template applied to `messages` with the assistant turn opened."""
  if not has_template(tokenizer):
    raise ConfigError("the tokenizer has no chat template (a base model, or tokenizer files without "
                      "'chat_template'); send plain prompts, or pass --chat_template FILE with the instruct "
                      "model's template")
  return tokenizer.apply_chat_template(check_messages(messages), tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, messages) -> list[int]:
  """Token ids of the rendered chat prompt (no special tokens added beyond what the template writes)."""
  return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])


def encode_plain(tokenizer, text: str) -> list[int]:
  """Token ids of a plain prompt; the tokenizer's own special-token rule applies (BOS if it adds one)."""
  if not isinstance(text, str):
    raise ConfigError(f"prompt: expected a string, got {type(text).__name__}")
  ids = list(tokenizer(text)["input_ids"])
  if not ids:
    raise ConfigError("the prompt is empty (0 tokens); give at least one token of text")
  return ids
