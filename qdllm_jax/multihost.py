"""Multi-host runs (TPU pods, several CPU or GPU processes): initialisation, barriers and the check that every
host resumes from the same saved state. Every function is a no-op on one host."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from qdllm_jax.errors import ConfigError


def distributed_initialize() -> None:
  """jax.distributed.initialize(): cluster auto-detection on TPU pods, Slurm, Open MPI, ...; elsewhere (e.g. CPU
  hosts) from JAX_COORDINATOR_ADDRESS (read by JAX), JAX_NUM_PROCESSES and JAX_PROCESS_ID. Collectives between
  CPU processes use gloo."""
  kw = {k: int(os.environ[e]) for k, e in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
        if os.environ.get(e)}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)


def same_on_every_host(next_block: int, state_dir: str) -> None:
  """ConfigError on every process unless all resume from the same block (multi-host; no-op on one host)."""
  if jax.process_count() == 1:
    return
  seen = np.asarray(multihost_utils.process_allgather(np.asarray([next_block], np.int32))).reshape(-1)
  if len(set(seen.tolist())) > 1:
    raise ConfigError(f"the hosts see different saved states in {state_dir} (next blocks {seen.tolist()}); a "
                      "multi-host run resumes only from a workdir on a filesystem every host sees (NFS, GCS "
                      "FUSE): use one, or delete the state to start over")


def sync(name: str) -> None:
  """A barrier across the processes of a multi-host run (process 0 writes the workdir); no-op on one host."""
  if jax.process_count() > 1:
      multihost_utils.sync_global_devices(name)
