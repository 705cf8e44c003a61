"""Errors a user can cause. Each message says what was found, what was expected, and how to fix it."""


class QdllmError(Exception):
  """Base class of every error qdllm-jax raises on bad input."""


class CheckpointError(QdllmError):
  """A model directory or checkpoint file is missing, malformed or does not match its config."""


class ConfigError(QdllmError):
  """A configuration key or value is unknown or invalid."""


class QuantizationError(QdllmError):
  """A quantizer was given input it cannot handle (shapes, bits, non-finite values, ...)."""


class FormatError(QdllmError):
  """A packed weight has an unknown layout version or inconsistent fields."""
