"""The OpenAI-style request/response schema of `python -m qdllm_jax.serve` (no HTTP here).

POST /v1/completions       {"prompt": str | [str], "max_tokens", "temperature", "n", "seed", "model", "stream",
                            "user"}
POST /v1/chat/completions  {"messages": [{"role", "content"}], same optional fields}
Every field is checked (unknown fields, types, ranges, prompt length against the context) and a bad request is a
`BadRequest` (HTTP status, message naming the fix, OpenAI error "param" and "code"), raised before any decode.
"""
from __future__ import annotations

import time
import uuid

from qdllm_jax import chat_template
from qdllm_jax import engine as engine_lib
from qdllm_jax.errors import ConfigError
from qdllm_jax.sampling import settings as settings_lib

COMMON = ("model", "max_tokens", "temperature", "n", "seed", "stream", "user")
FIELDS = {"/v1/completions": ("prompt",) + COMMON, "/v1/chat/completions": ("messages",) + COMMON}
MAX_PROMPTS = 64


class BadRequest(Exception):
  """A client error: HTTP `status` with an OpenAI-style error body."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                      "code": self.code}}


def _int(body, name, lo, hi, default):
  v = body.get(name, default)
  if isinstance(v, bool) or not isinstance(v, int):
    raise BadRequest(400, f"'{name}' must be an integer, got {type(v).__name__} {v!r:.40}", name, "invalid_type")
  if not lo <= v <= hi:
    raise BadRequest(400, f"'{name}'={v} is out of range; expected {lo} <= {name} <= {hi}", name, "out_of_range")
  return v


def parse(route: str, body, eng, base, *, max_n: int, model_name: str) -> tuple[list[list[int]], object, int, dict]:
  """(prompt rows, settings, seed or None, request facts) of a request body, or BadRequest.

  Rows are prompt-major: prompt p's n copies are rows p*n .. p*n + n - 1. `base`: the server's sampler
  settings (max_tokens scales them with `settings.with_gen_length`, temperature replaces theirs)."""
  if not isinstance(body, dict):
    raise BadRequest(400, f"the body is a JSON {type(body).__name__}; expected a JSON object", None, "invalid_body")
  unknown = sorted(set(body) - set(FIELDS[route]))
  if unknown:
    raise BadRequest(400, f"unknown field(s) {unknown}; {route} accepts {list(FIELDS[route])}", unknown[0],
                     "unknown_field")
  main = FIELDS[route][0]
  if main not in body:
    raise BadRequest(400, f"missing required field '{main}'", main, "missing_field")
  if body.get("stream", False) is not False:
    raise BadRequest(400, "streaming is not supported; omit 'stream' or set it to false", "stream", "unsupported")
  if "model" in body and body["model"] != model_name:
    raise BadRequest(404, f"model {body['model']!r:.60} is not served here; this server serves {model_name!r} "
                     "(omit 'model' or use that name)", "model", "model_not_found")
  if "user" in body and not isinstance(body["user"], str):
    raise BadRequest(400, "'user' must be a string", "user", "invalid_type")
  n = _int(body, "n", 1, max_n, 1)
  seed = None if body.get("seed") is None else _int(body, "seed", 0, 2**31 - 1, 0)
  max_tokens = _int(body, "max_tokens", 1, eng.config.max_seq_len - 1, base.gen_length)
  temp = body.get("temperature", base.temperature)
  if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0 <= temp <= 10:
    raise BadRequest(400, f"'temperature' must be a number in [0, 10], got {temp!r:.40}", "temperature",
                     "invalid_type" if not isinstance(temp, (int, float)) or isinstance(temp, bool) else "out_of_range")
  try:
    s = settings_lib.with_gen_length(base, max_tokens)
    s.temperature = float(temp)
    settings_lib.validate(s)
  except ConfigError as e:
    raise BadRequest(400, str(e), "max_tokens", "invalid_value") from None
  prompts = _prompts(route, body[main], eng)
  for ids in prompts:
    try:
      engine_lib.check_context(len(ids), s, eng.config)
    except ConfigError as e:
      raise BadRequest(400, str(e), main, "context_length_exceeded") from None
  rows = [ids for ids in prompts for _ in range(n)]
  return rows, s, seed, {"n": n, "prompt_tokens": sum(len(p) for p in prompts)}


def _prompts(route, value, eng) -> list[list[int]]:
  tok = eng.tokenizer
  try:
    if route == "/v1/chat/completions":
      if not chat_template.has_template(tok):
        raise BadRequest(400, "this model's tokenizer has no chat template (a base model); use /v1/completions, or "
                         "restart the server with --chat_template FILE", "messages", "no_chat_template")
      return [chat_template.encode_chat(tok, value)]
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, list) or not value or len(value) > MAX_PROMPTS or not all(
        isinstance(p, str) for p in value):
      raise BadRequest(400, f"'prompt' must be a string or a list of 1..{MAX_PROMPTS} strings", "prompt",
                       "invalid_type")
    return [chat_template.encode_plain(tok, p) for p in value]
  except ConfigError as e:
    raise BadRequest(400, str(e), "messages" if route.endswith("chat/completions") else "prompt",
                     "invalid_value") from None


def response(route: str, eng, outs, facts: dict, model_name: str) -> dict:
  """The OpenAI-style response body for the decoded rows `outs` (int32 [gen_length] each, prompt-major)."""
  choices, completion_tokens = [], 0
  stops = eng.stop_ids
  for i, gen in enumerate(outs):
    ids = eng.completion(gen)
    completion_tokens += len(ids)
    text = eng.tokenizer.decode(ids, skip_special_tokens=True)
    reason = "stop" if any(int(t) in stops for t in gen) else "length"
    if route == "/v1/chat/completions":
      choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason})
    else:
      choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
  chat = route == "/v1/chat/completions"
  return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
          "object": "chat.completion" if chat else "text_completion", "model": model_name, "choices": choices,
          "usage": {"prompt_tokens": facts["prompt_tokens"], "completion_tokens": completion_tokens,
                    "total_tokens": facts["prompt_tokens"] + completion_tokens}}
