"""Fixtures of tests/eval live in eval_common.py (a unique module name: several test folders have a conftest)."""
from eval_common import *  # noqa: F401,F403
