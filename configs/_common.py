"""Shared assembly of the model configs: base schema + model settings + method presets.

Config files are loaded by path (`--config configs/llada8b.py[:preset]`); each inserts the repository root on
sys.path so that `configs.base` and `configs.presets` import from any working directory.
"""
import os

from configs import base, presets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(arg, **settings):
  """get_base() with `settings` ({"section.key": value} or {"key": value}) applied, then the presets in `arg`."""
  c = base.get_base()
  for k, v in settings.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = getattr(node, p)
    setattr(node, leaf, v)
  return presets.apply(c, arg)
