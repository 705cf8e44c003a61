"""The one flag parser: the launch, the study and the evaluation command take the same override forms
(--config.a.b=v and --config.a.b v), list their keys with --help_keys from the schema, and exit 2 naming the
fix on a bad flag."""
import dataclasses

import pytest

from qdllm_jax import cli, config_schema, launch, study
from qdllm_jax import config_check as config_lib
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval import __main__ as eval_cli


def test_both_override_forms():
  got = cli.split_overrides(["--config.quant.bits=3", "--config.seed", "4", "--config.calib.source", "a=b"],
                            "--config.", "prog")
  assert got == [("quant.bits", "3"), ("seed", "4"), ("calib.source", "a=b")]
  with pytest.raises(ConfigError, match="has no value"):
    cli.split_overrides(["--config.seed"], "--config.", "prog")
  with pytest.raises(ConfigError, match="unknown argument '--bogus'"):
    cli.split_overrides(["--bogus"], "--config.", "prog")


def test_overrides_are_typed_by_the_schema():
  c = config_schema.defaults(config_schema.StudySpec)
  cli.set_override(c, "weight_only.group_size", "64")
  cli.set_override(c, "awq.clip", "false")
  cli.set_override(c, "entries", "fp,gptq:w4a16")
  assert (c.weight_only.group_size, c.awq.clip, c.entries) == (64, False, ("fp", "gptq:w4a16"))
  with pytest.raises(ConfigError, match="expected a int"):
    cli.set_override(c, "seed", "x")


@pytest.mark.parametrize("main,schema", [(launch.main, config_schema.RunSpec), (study.main, config_schema.StudySpec),
                                         (eval_cli.main, config_schema.SuiteSpec)])
def test_help_keys_lists_every_schema_key(main, schema, capsys):
  assert main(["--help_keys"]) == 0
  out = capsys.readouterr().out
  keys = [k for k, _, _ in config_schema.describe(schema)]
  assert keys and all(f"--config.{k} " in out for k in keys)


@pytest.mark.parametrize("main,argv", [(launch.main, ["--config", "configs/tiny.py", "--bogus"]),
                                       (study.main, ["--config", "configs/study_tiny.py", "--bogus"]),
                                       (eval_cli.main, ["--model", "x", "--protocol", "tiny"])])
def test_bad_flag_exits_2_with_the_fix(main, argv, capsys):
  assert main(argv) == 2
  assert "--config.KEY=VALUE" in capsys.readouterr().err


def test_schema_defaults_round_trip():
  # the ConfigDict built from the dataclasses validates back into the same dataclass values
  for cls in (config_schema.RunSpec, config_schema.StudySpec, config_schema.SuiteSpec):
    d = config_lib.check_types(config_schema.defaults(cls), config_schema.defaults(cls))
    assert dataclasses.asdict(config_schema.build(cls, d)) == dataclasses.asdict(cls())
