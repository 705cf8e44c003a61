"""Progress of the block loop on a terminal: a bar of blocks and a bar of the current block's matrices, with
the time remaining. Fed by the pipeline's hooks (BlockHooks.on_matrix / on_block), never by log text."""
from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


class BlockProgress:
  """The two bars; `matrix(entry)` after each quantized matrix, `block()` after each block."""

  def __init__(self, total: int, initial: int, per_block: int):
    off = not sys.stderr.isatty()
    self.blocks = tqdm(total=total, initial=initial, desc="blocks", unit="block", disable=off, position=0)
    self.matrices = tqdm(total=per_block, desc="matrices", unit="mat", disable=off, position=1, leave=False)

  def matrix(self, entry: dict) -> None:
    del entry
    self.matrices.update(1)

  def block(self) -> None:
    self.blocks.update(1)
    self.matrices.reset()

  def close(self) -> None:
    self.matrices.close()
    self.blocks.close()


@contextlib.contextmanager
def block_progress(total: int, initial: int, per_block: int):
  """A BlockProgress that is closed on exit (also on an error)."""
  bars = BlockProgress(total, initial, per_block)
  try:
    yield bars
  finally:
    bars.close()
