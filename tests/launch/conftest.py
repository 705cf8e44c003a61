"""Fixtures of tests/launch live in launch_common.py (a unique module name: several test folders have a conftest)."""
from launch_common import *  # noqa: F401,F403
