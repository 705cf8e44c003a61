"""Dream-v0-Instruct-7B (Dream-org/Dream-v0-Instruct-7B). Paper settings: configs/_common.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs._common import paper_config  # noqa: E402


def get_config(arg=None):
  return paper_config("dream", arg)
