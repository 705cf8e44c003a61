"""Config loading and validation: every bad input gives a ConfigError naming the key before heavy work, and a
failed launch leaves no workdir behind."""
import json
import os
import shutil

import pytest
from launch_common import ROOT, fast_argv

from qdllm_jax import config_check as config_lib
from qdllm_jax import launch
from qdllm_jax.errors import ConfigError
from qdllm_jax.models import families

CONFIGS = ["tiny", "llada8b", "llada8b_instruct", "llada15", "dream7b", "dream7b_instruct"]


def _cfg(name="tiny", *overrides, preset=""):
  spec = os.path.join(ROOT, "configs", f"{name}.py") + (f":{preset}" if preset else "")
  return launch.load_config(spec, list(overrides))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates_for_a_dry_run(name):
  spec = config_lib.validate(_cfg(name), dry_run=True)
  assert spec.quant.method == "quant_dllm" and spec.quant.bits == 2
  if name.startswith("dream"):
    assert (spec.quant.abmp_ratio, spec.calib.seed_x, spec.eval.protocol) == (0.10, 100, "quant_dllm_dream")
  elif name.startswith("llada"):
    assert (spec.quant.abmp_ratio, spec.calib.seed_x, spec.eval.protocol) == (0.05, 0, "quant_dllm_llada")
    assert (spec.calib.nsamples, spec.calib.seqlen, spec.quant.group_size) == (128, 4096, 128)


@pytest.mark.parametrize("preset,method,bits", [("gptq_w3", "gptq", 3), ("rtn_w4", "rtn", 4),
                                                ("order1", "quant_dllm", 1), ("quant_dllm_w2", "quant_dllm", 2)])
def test_presets_set_the_method(preset, method, bits):
  spec = config_lib.validate(_cfg("llada8b", preset=preset), dry_run=True)
  assert (spec.quant.method, spec.quant.bits) == (method, bits)


def test_ablation_presets_combine():
  spec = config_lib.validate(_cfg("dream7b", preset="no_mcs,no_dor,no_abmp,no_comp"), dry_run=True)
  assert (spec.calib.mcs, spec.quant.dor, spec.quant.abmp_ratio, spec.quant.compensation) == (False, False, 0.0, False)


def test_overrides_are_typed_like_the_defaults():
  c = _cfg("tiny", ("quant.bits", "3"), ("mesh.shape", "(2,4)"), ("calib.mcs", "false"), ("quant.percdamp", "1"),
           ("calib.source", "/x/y.jsonl"))
  assert c.quant.bits == 3 and c.mesh.shape == (2, 4) and c.calib.mcs is False and c.quant.percdamp == 1.0
  assert c.calib.source == "/x/y.jsonl"
  c = _cfg("tiny", ("eval.task_map", "gsm8k=gsm8k_local,mbpp=mbpp_local"))  # comma-separated words form a tuple
  assert c.eval.task_map == ("gsm8k=gsm8k_local", "mbpp=mbpp_local")
  args, ov = launch.parse_args(["--config", "c.py", "--config.quant.bits", "3", "--config.seed=4", "--dry_run"])
  assert args.dry_run and ov == [("quant.bits", "3"), ("seed", "4")]


@pytest.mark.parametrize("overrides,needle", [
    ([("quant.bitz", "3")], "quant.bitz"),
    ([("calib.nsamples", "many")], "calib.nsamples"),
    ([("quant.bits", "true")], "quant.bits"),
    ([("nosuch.key", "1")], "nosuch"),
])
def test_bad_overrides_are_refused_when_loading(overrides, needle):
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    _cfg("tiny", *overrides)


def test_unknown_preset_and_missing_file():
  with pytest.raises(ConfigError, match="gptq_w9"):
    _cfg("tiny", preset="gptq_w9")
  with pytest.raises(ConfigError, match="does not exist"):
    launch.load_config("configs/nope.py")


def test_unknown_key_added_in_a_config_file_is_refused():
  c = _cfg("tiny")
  c.quant.bitz = 3
  with pytest.raises(ConfigError, match=r"quant\.bitz"):
    config_lib.validate(c, dry_run=True)


@pytest.mark.parametrize("overrides,needle", [
    ([("quant.bits", "5")], r"quant\.bits=5.*1, 2 or 3"),
    ([("quant.method", "gptq"), ("quant.bits", "9")], r"quant\.bits=9"),
    ([("quant.group_size", "48")], r"quant\.group_size=48.*multiple of 32"),
    ([("quant.method", "gptq"), ("quant.group_size", "96")], r"quant\.group_size=96"),
    ([("quant.abmp_ratio", "1.5")], "abmp_ratio"),
    ([("quant.abmp_scope", "global"), ("quant.bits", "3")], "abmp_scope"),
    ([("quant.embeddings", "int8")], "full precision"),
    ([("calib.prefix_ratio", "1.0")], "prefix_ratio"),
    ([("calib.mcs", "False"), ("calib.timesteps_per_sample", "2")], "timesteps_per_sample"),
    ([("calib.source", "/no/such/c4.json.gz")], r"calib\.source"),
    ([("eval.protocol", "mmlu_please")], r"eval\.protocol"),
    ([("mesh.axes", "('data','tensor')")], r"mesh\.axes"),
    ([("mesh.shape", "(2,2,2)")], r"mesh\.shape"),
    ([("plan.hardware", "tpu_v99")], r"plan\.hardware"),
    ([("dtype", "int4")], "dtype"),
    ([("eval.include_path", "/no/such/tasks")], r"eval\.include_path"),
    ([("eval.protocol", "qdlm_llada"), ("eval.task_map", "gsm8k")], r"eval\.task_map"),
    ([("eval.protocol", "qdlm_llada"), ("eval.task_map", "nosuchtask=x")], r"eval\.task_map"),
])
def test_invalid_values(overrides, needle, model_dir, tmp_path):
  with pytest.raises(ConfigError, match=needle):
    config_lib.validate(_cfg("tiny", ("model_path", model_dir), *overrides), workdir=str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_model_path_and_workdir(tmp_path, model_dir):
  with pytest.raises(ConfigError, match="model_path"):
    config_lib.validate(_cfg("tiny", ("model_path", "")), workdir=str(tmp_path / "w"))
  with pytest.raises(ConfigError, match="make_tiny_model"):
    config_lib.validate(_cfg("tiny", ("model_path", str(tmp_path / "tiny-llada"))), workdir=str(tmp_path / "w"))
  with pytest.raises(ConfigError, match="workdir"):
    config_lib.validate(_cfg("tiny", ("model_path", model_dir)))
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="workdir"):
    config_lib.validate(_cfg("tiny", ("model_path", model_dir)), workdir=str(blocker / "run"))
  spec = config_lib.validate(_cfg("tiny", ("model_path", model_dir)), workdir=str(tmp_path / "new" / "run"))
  assert spec.workdir.endswith("run") and not os.path.exists(tmp_path / "new")


def test_group_size_must_divide_the_model_widths(model_dir):
  from qdllm_jax.models import open_checkpoint
  cfg = open_checkpoint(model_dir).config  # d_model 64, mlp 128
  spec = config_lib.validate(_cfg("tiny", ("quant.group_size", "96")), dry_run=True)
  with pytest.raises(ConfigError, match="group_size=96.*divisor"):
    config_lib.check_model(spec, cfg)
  spec = config_lib.validate(_cfg("tiny", ("calib.seqlen", "512")), dry_run=True)
  with pytest.raises(ConfigError, match="seqlen"):
    config_lib.check_model(spec, cfg)


def test_module_order_and_group_size_are_checked_against_the_models_family():
  """BERT's linears are q/k/v, o, up, down: the decoders' llada_runner order and their width labels do not apply."""
  mini = families.preset("minilm_l6")  # widths: q/k/v, o, up read 384 channels; down reads 1536
  spec = config_lib.validate(_cfg("tiny", ("eval.protocol", ""), ("quant.module_order", "llada_runner")),
                             dry_run=True)
  with pytest.raises(ConfigError, match=r"config.quant.module_order='llada_runner'; expected one of \['standard'\] "
                                        "for bert models"):
    config_lib.check_model(spec, mini)
  assert len(config_lib.check_model(spec, families.preset("tiny_llada")).modules) == 4 * 7
  spec = config_lib.validate(_cfg("tiny", ("eval.protocol", ""), ("quant.group_size", "256")), dry_run=True)
  with pytest.raises(ConfigError, match=r"group_size=256.*\{'q/k/v': 384, 'o': 384, 'up': 384\} are not"):
    config_lib.check_model(spec, mini)


def _copy_with(src, dst, **config_changes):
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    c = json.load(f)
  c.update(config_changes)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(c, f)
  return str(dst)


@pytest.mark.parametrize("change,needle", [({"mask_token_id": 3}, "mask"), ({"vocab_size": 300, "embedding_size": 300},
                                                                          "320 ids")])
def test_tokenizer_mismatch_fails_before_heavy_work_without_workdir_garbage(tmp_path, model_dir, change, needle,
                                                                           capsys):
  """A tokenizer whose mask id or size disagrees with config.json: exit status 2, a clear message, no workdir.
  (The weights still match: mask id and vocabulary rows are only checked against the tokenizer.)"""
  if "vocab_size" in change:  # the weights must stay consistent with config.json: rebuild at 300 rows
    from launch_common import make_model
    bad = tmp_path / "bad"
    make_model(bad, model_dir, vocab_size=300, embedding_size=300)
    bad = str(bad)
  else:
    bad = _copy_with(model_dir, tmp_path / "bad", **change)
  wd = tmp_path / "run"
  assert launch.main(fast_argv(bad, wd)) == 2
  err = capsys.readouterr().err
  assert "ConfigError" in err and needle in err
  assert not wd.exists()


def test_cli_errors_leave_no_workdir(tmp_path, model_dir, capsys):
  wd = tmp_path / "run"
  assert launch.main(fast_argv(model_dir, wd, "--config.quant.bits=5")) == 2
  assert launch.main(fast_argv(model_dir, wd, "--config.quant.group_size=96")) == 2
  assert launch.main(fast_argv(model_dir, wd, "--config.quant.bitz=2")) == 2
  assert launch.main(fast_argv(model_dir, wd, "--bogus")) == 2
  err = capsys.readouterr().err
  assert "quant.bits=5" in err and "group_size=96" in err and "quant.bitz" in err and "--bogus" in err
  assert not wd.exists()


def test_lm_eval_settings_reach_the_adapter(monkeypatch):
  """eval.ignore_cfg / include_path / task_map of the config are what the lm-eval adapter receives."""
  import argparse
  import sys
  import types

  import qdllm_jax.eval
  from qdllm_jax import sharding
  from qdllm_jax.eval import run_eval
  seen = {}
  fake = types.SimpleNamespace(run_protocol=lambda model, tok, proto, **kw: seen.update(kw) or {"results": {}})
  monkeypatch.setitem(sys.modules, "qdllm_jax.eval.lm_eval_adapter", fake)  # lm-eval is an optional extra
  monkeypatch.setattr(qdllm_jax.eval, "lm_eval_adapter", fake, raising=False)
  ev = argparse.Namespace(protocol="qdlm_dream", limit=0, ignore_cfg=True, include_path="/tasks",
                          task_map=("gsm8k=gsm8k_local",))
  run_eval.evaluate(None, None, ev, 3, sharding.make_run_mesh({}))
  assert seen == dict(limit=None, seed=3, ignore_cfg=True, include_path="/tasks", task_map={"gsm8k": "gsm8k_local"})
