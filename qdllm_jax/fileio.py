"""Atomic directory writes shared by every saver (HF checkpoints, Orbax checkpoints, resume state, exports).

`atomic_dir(target)` yields a temporary sibling directory and renames it to `target` only when the block
succeeds; an old `target` is moved aside first and deleted only after the swap, so a crash (even kill -9)
leaves either the old directory or the new one, never a half-written one.

The temporary names record their writer, `.<name>.tmp-p<pid>@<host>-<random>` (and `.old-` for a moved-aside
target), so that `clean_stale` removes those whose writer is gone (killed) and leaves a live writer's alone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile

from qdllm_jax.errors import CheckpointError, QdllmError

_STALE = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?:p(?P<pid>\d+)@(?P<host>.+)-)?[A-Za-z0-9_]+$")
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT) if hasattr(errno, "EDQUOT") else (errno.ENOSPC,)


def fsync_dir(path: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def is_disk_error(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return True
    if "No space left" in str(e) or "Disk quota" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def atomic_dir(target: str, *, overwrite: bool = False, what: str = "checkpoint"):
  """Yield a temporary directory beside `target`, renamed to `target` when the block succeeds.

  Any exception inside the block deletes the temporary directory; OSError / Orbax errors become
  CheckpointError (a full disk says so). `target` must have passed `preflight`.
  """
  parent, base = os.path.split(target)
  try:
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{_owner()}-", dir=parent)
  except OSError as e:
    raise CheckpointError(f"{what}: cannot write in {parent} ({e.strerror}); choose a writable location") from e
  old = None
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is an ordinary readable directory
    yield tmp
    fsync_dir(tmp)
    if os.path.lexists(target):  # overwrite: move the old one aside, swap the new one in, delete the old
      old = tempfile.mkdtemp(prefix=f".{base}.old-{_owner()}-", dir=parent)
      os.rename(target, os.path.join(old, base))
    try:
      os.rename(tmp, target)
    except OSError:
      if old is not None:
        os.rename(os.path.join(old, base), target)
      raise
    fsync_dir(parent)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, QdllmError)):
      raise
    if is_disk_error(e):
      raise CheckpointError(f"{what}: the disk under {parent} is full ({e}); nothing was written to {target}. "
                            "Free disk space and save again") from e
    raise CheckpointError(f"{what}: writing {target} failed ({type(e).__name__}: {e}); nothing was written "
                          "there. Fix the cause and save again") from e
  finally:
    if old is not None and os.path.isdir(target):  # never delete the only copy if the restore failed too
      shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
  """Write a small file atomically: a temporary sibling named for its writer (`.<name>.tmp-p<pid>@<host>-<rand>`,
  so concurrent writers never share one and `clean_stale` removes a killed writer's), fsync, then rename."""
  parent, base = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-{_owner()}-", dir=parent)
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is read by others
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _owner() -> str:
  return f"p{os.getpid()}@{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def clean_stale(parent: str, *, force: bool = False) -> list[str]:
  """Remove the temporary directories `atomic_dir` (and files `atomic_write_text`) left in `parent` when their
  writer was killed; returns them.

  A `.<name>.tmp-*` / `.<name>.old-*` directory is stale when its recorded writer process is gone (same host,
  pid not running); one of another host, of this process or of a live process is kept, as is one without a
  recorded writer (an older qdllm-jax), unless force=True (--overwrite). An `.old-` directory is removed only
  when `<name>` itself exists (otherwise it may hold the only copy).
  """
  removed = []
  if not os.path.isdir(parent):
    return removed
  host = _owner().split("@", 1)[1]
  for n in sorted(os.listdir(parent)):
    m = _STALE.match(n)
    path = os.path.join(parent, n)
    if not m or not (os.path.isdir(path) or (m["kind"] == "tmp" and os.path.isfile(path))):
      continue
    pid = int(m["pid"]) if m["pid"] else None
    gone = pid is not None and m["host"] == host and pid != os.getpid() and not _alive(pid)
    if not (force or gone):
      continue
    if m["kind"] == "old" and not os.path.isdir(os.path.join(parent, m["base"])):
      continue
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(path)
    removed.append(path)
  return removed
