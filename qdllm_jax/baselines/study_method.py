"""`StudyMethod`: what one method of the PTQ study (study.py) declares, so that the study reads it instead of
spelling method names (the registry is baselines/study_registry.py).

A study method is one object in the module that implements it (baselines/<name>.py, or baselines/weight_only.py
for the package's own weight methods), plus one line in baselines/study_registry.py:
  name               the entry spelling: `<name>:w<bits>a<bits>`
  weight_activation  True: it quantizes activations too (entries need a < 16); False: weight-only (a16 only)
  allows_a16         a weight-activation method whose weights-only form is an entry too (QuaRot's rotated weights)
  sections           the study config sections its result depends on beside the shared ones (dtype, seed, calib,
                     eval): the entry's fingerprint hashes exactly these, so editing another method's section
                     keeps its cached row
  check              settings (the plain study config dict) -> None, or a message naming the bad `config.*` key,
                     the value found and the one expected (run on every study before loading anything)
  build              (fp Model, calibration ids int32 [N, L], w_bits, a_bits, settings, key) -> the Model to score
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class StudyMethod:
  """One method of the PTQ study (see the module docstring for the fields)."""
  name: str
  weight_activation: bool
  sections: tuple[str, ...]
  build: Callable
  check: Callable[[dict], str | None] = lambda settings: None
  allows_a16: bool = False


__all__ = ["StudyMethod"]
