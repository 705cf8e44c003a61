"""A plain (non-editable) install works away from the checkout: the package carries its shipped model and
corpus as package data, and the config files of a checkout import it like any installed package (no sys.path
manipulation anywhere). The package is installed with `pip install --no-deps --target` (its dependencies are the
test environment's), and every command runs from an empty directory with the checkout off sys.path."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  target = tmp_path_factory.mktemp("site")
  build = tmp_path_factory.mktemp("build")
  env = dict(os.environ, PIP_NO_INPUT="1")
  # build from a copy of the checkout's tracked files so the checkout's own build/ and egg-info stay untouched
  files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
  for f in filter(None, files):
    src, dst = os.path.join(ROOT, f.decode()), os.path.join(build, f.decode())
    if os.path.islink(src) or not os.path.isfile(src):
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as a, open(dst, "wb") as b:
      b.write(a.read())
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                      "--target", str(target), str(build)], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  return target


def _run(target, cwd, *args, timeout=300):
  # the checkout must not be importable: only the installed copy and the test environment's site-packages
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", PYTHONSAFEPATH="1")
  return subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_installed_package_carries_its_data(installed, tmp_path):
  code = ("import qdllm_jax, os; from qdllm_jax.data import shipped, corpus; "
          "print(qdllm_jax.__file__); "
          "print(os.path.isfile(os.path.join(shipped.TINY_MODEL_DIR, 'model.safetensors'))); "
          "print(len(corpus.load_splits()['train']))")
  r = _run(installed, tmp_path, "-c", code)
  assert r.returncode == 0, r.stderr[-2000:]
  where, has_model, n_train = r.stdout.split()
  assert where.startswith(str(installed)) and has_model == "True" and int(n_train) > 100


def test_checkout_config_plans_from_any_directory(installed, tmp_path):
  r = _run(installed, tmp_path, "-m", "qdllm_jax.launch", "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--dry_run")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "DRY RUN" in r.stdout + r.stderr


@pytest.mark.slow
def test_checkout_config_runs_the_main_job_from_any_directory(installed, tmp_path):
  r = _run(installed, tmp_path, "-m", "qdllm_jax.launch", "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--workdir", str(tmp_path / "run"), "--config.eval.protocol=", "--config.report.plots=False",
           timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(tmp_path / "run" / "report.json")
