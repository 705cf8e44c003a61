"""checkpoint_io: bit-exact save/load round trips, streaming, and every bad input raising a named CheckpointError.

File contents are checked with `safetensors.numpy` directly (an independent reader), names against the
checkpoints' tensor names (test_models_equations.reference_tensors on the tiny sizes via hf names).
"""
import ast
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qdllm_jax.errors import CheckpointError, ConfigError
from qdllm_jax.models import hf, hf_tokenizer
from qdllm_jax.models import hf_checkpoint as cio
from qdllm_jax.models.dream import DREAM_TINY_TEST
from qdllm_jax.models.llada import LLADA_TINY_TEST
from qdllm_jax.models.model import Model

BF16 = np.dtype(jnp.bfloat16)


def bits(a):
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_tree_bit_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    if k == "blocks":
      assert len(a[k]) == len(b[k])
      for x, y in zip(a[k], b[k]):
        assert_tree_bit_equal(x, y)
    else:
      assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
      np.testing.assert_array_equal(bits(a[k]), bits(b[k]), err_msg=k)


def hf_flat(params, cfg):
  """{HF name: array} built with the name table (an independent traversal of the pytree)."""
  return {n: params[p[0]] if len(p) == 1 else params["blocks"][p[1]][p[2]] for n, p in hf.all_names(cfg).items()}


@pytest.fixture
def saved(tmp_path, tiny_cfg, make_params):
  params = make_params(tiny_cfg, seed=0)
  path = cio.save_pretrained(params, tiny_cfg, tmp_path / "ckpt")
  return path, params


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_round_trip_single_file_bit_exact(tmp_path, arch, tiny_cfg, make_params, dtype):
  params = make_params(tiny_cfg, seed=1, dtype=dtype)
  out = cio.save_pretrained(params, tiny_cfg, tmp_path / "out")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == {"llada": LLADA_TINY_TEST, "dream": DREAM_TINY_TEST}[arch]  # fields unchanged
  stored = load_file(os.path.join(out, "model.safetensors"))  # independent reader
  assert sorted(stored) == sorted(hf_flat(params, tiny_cfg))
  for n, a in hf_flat(params, tiny_cfg).items():
    np.testing.assert_array_equal(bits(stored[n]), bits(a), err_msg=n)
  model = cio.load_pretrained(out)
  assert isinstance(model, Model) and model.config == tiny_cfg
  assert_tree_bit_equal(model.params, params)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_round_trip_sharded_bit_exact(tmp_path, tiny_cfg, make_params, dtype):
  params = make_params(tiny_cfg, seed=2, dtype=dtype)
  limit = 6000
  out = cio.save_pretrained(params, tiny_cfg, tmp_path / "out", max_shard_bytes=limit)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and "model.safetensors" not in os.listdir(out)
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
  total = 0
  for s in shards:
    t = load_file(os.path.join(out, s))
    nbytes = sum(a.nbytes for a in t.values())
    assert nbytes <= limit or len(t) == 1  # a tensor larger than the limit gets its own shard
    assert all(index["weight_map"][n] == s for n in t)
    total += nbytes
  assert index["metadata"]["total_size"] == total == sum(a.nbytes for a in hf_flat(params, tiny_cfg).values())
  assert_tree_bit_equal(cio.load_pretrained(out).params, params)


def test_stream_blocks_and_top_equal_full_load(tmp_path, tiny_cfg, make_params):
  params = make_params(tiny_cfg, seed=3, dtype=BF16)
  out = cio.save_pretrained(params, tiny_cfg, tmp_path / "out", max_shard_bytes=5000)
  full = cio.load_pretrained(out).params
  seen = []
  for i, blk in cio.stream_blocks(out):
    seen.append(i)
    assert_tree_bit_equal(blk, full["blocks"][i])
  assert seen == list(range(tiny_cfg.n_layers))
  assert_tree_bit_equal(cio.load_top(out), {k: v for k, v in full.items() if k != "blocks"})
  reader = cio.open_checkpoint(out)
  blk = reader.block(1, numpy=True)
  assert isinstance(blk["q"], np.ndarray) and np.array_equal(bits(blk["q"]), bits(params["blocks"][1]["q"]))
  name = hf.block_names(tiny_cfg, 0)["down"]
  np.testing.assert_array_equal(bits(reader.read(name)), bits(params["blocks"][0]["down"]))


def test_dtype_cast_on_load(saved):
  path, params = saved
  got = cio.load_pretrained(path, dtype="bfloat16").params["blocks"][0]["gate"]
  u = params["blocks"][0]["gate"].view(np.uint32).astype(np.uint64)
  rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round-to-nearest-even by hand
  assert got.dtype == jnp.bfloat16 and np.array_equal(bits(got), rne)
  back = cio.load_pretrained(path, dtype=jnp.float32).params["embed"]
  assert back.dtype == jnp.float32 and np.array_equal(bits(back), bits(params["embed"]))
  with pytest.raises(ConfigError, match="int8"):
    cio.load_pretrained(path, dtype="int8")


def test_open_checkpoint_reads_headers_only(saved, monkeypatch):
  path, _ = saved
  calls = []
  real = cio.safe_open

  class Spy:
    def __init__(self, *a, **k):
      self.f = real(*a, **k)

    def __enter__(self):
      self.inner = self.f.__enter__()
      return self

    def __exit__(self, *a):
      return self.f.__exit__(*a)

    def keys(self):
      return self.inner.keys()

    def get_slice(self, n):
      return self.inner.get_slice(n)

    def get_tensor(self, n):
      calls.append(n)
      return self.inner.get_tensor(n)

  monkeypatch.setattr(cio, "safe_open", Spy)
  reader = cio.open_checkpoint(path)
  assert calls == [] and len(reader.tensors) == len(hf.all_names(reader.config))
  reader.block(0)
  assert sorted(calls) == sorted(hf.block_names(reader.config, 0).values())


# ---- bad inputs: each raises CheckpointError naming the file/tensor and what was expected -----------------
def _rewrite(path, fn):
  """Apply fn to the {name: array} of model.safetensors and write it back."""
  file = os.path.join(path, "model.safetensors")
  t = dict(load_file(file))
  fn(t)
  save_file(t, file)
  return file


def test_missing_directory_config_weights(tmp_path, saved):
  path, _ = saved
  with pytest.raises(CheckpointError, match="does not exist"):
    cio.load_pretrained(tmp_path / "nope")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(CheckpointError, match="no weights file; expected model.safetensors"):
    cio.open_checkpoint(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(CheckpointError, match="no config.json"):
    cio.open_checkpoint(path)


def test_bad_and_unknown_config(saved):
  path, _ = saved
  cfg_file = os.path.join(path, "config.json")
  with open(cfg_file, "w") as f:
    f.write("{not json")
  with pytest.raises(CheckpointError, match="config.json: cannot read"):
    cio.open_checkpoint(path)
  with open(cfg_file, "w") as f:
    json.dump({"model_type": "gpt2", "n_layer": 2}, f)
  with pytest.raises(CheckpointError, match=r"config.json: unknown model_type 'gpt2'.*'llada'.*'Dream'"):
    cio.open_checkpoint(path)


def test_missing_tensor(saved, tiny_cfg):
  path, _ = saved
  name = hf.block_names(tiny_cfg, 1)["up"]
  _rewrite(path, lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' \(canonical blocks\[1\].up, "
                                           rf"shape \({tiny_cfg.mlp_hidden}, {tiny_cfg.d_model}\)\) is missing"):
    cio.open_checkpoint(path)


def test_extra_tensor(saved):
  path, _ = saved
  _rewrite(path, lambda t: t.update({"model.rotary_emb.inv_freq": np.zeros(4, np.float32)}))
  with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.rotary_emb.inv_freq'"):
    cio.open_checkpoint(path)


def test_shape_mismatch(saved, tiny_cfg):
  path, _ = saved
  name = hf.top_names(tiny_cfg)["embed"]
  _rewrite(path, lambda t: t.update({name: np.zeros((tiny_cfg.vocab_size + 1, tiny_cfg.d_model), np.float32)}))
  with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \({tiny_cfg.vocab_size + 1}, "
                                           rf"{tiny_cfg.d_model}\), expected \({tiny_cfg.vocab_size}, "):
    cio.open_checkpoint(path)


def test_non_float_dtype(saved, tiny_cfg):
  path, _ = saved
  name = hf.top_names(tiny_cfg)["final_norm"]
  _rewrite(path, lambda t: t.update({name: np.ones(tiny_cfg.d_model, np.int32)}))
  with pytest.raises(CheckpointError, match=rf"'{name}' has dtype I32"):
    cio.open_checkpoint(path)


def test_pickle_checkpoint_refused(saved):
  path, _ = saved
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x04 would be unpickled here")
  with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*pickle checkpoints are refused.*safetensors"):
    cio.load_pretrained(path)


@pytest.mark.parametrize("module", [cio, hf_tokenizer])
def test_module_has_no_pickle_path(module):
  tree = ast.parse(open(module.__file__).read())
  imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                   if isinstance(n, ast.ImportFrom) and n.module}
  assert not imported & {"pickle", "torch", "dill", "joblib", "cloudpickle"}
  calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
  assert not any(ast.unparse(c.func).endswith(("torch.load", "pickle.load", "load_state_dict")) for c in calls)
  remote = [k.value for c in calls for k in c.keywords if k.arg == "trust_remote_code"]
  assert all(isinstance(v, ast.Constant) and v.value is False for v in remote)
  assert remote or module is cio  # the tokenizer loader says trust_remote_code=False explicitly


def test_sharded_index_errors_before_reading_data(tmp_path, tiny_cfg, make_params, monkeypatch):
  params = make_params(tiny_cfg, seed=4)
  out = cio.save_pretrained(params, tiny_cfg, tmp_path / "out", max_shard_bytes=6000)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  os.remove(os.path.join(out, shards[-1]))
  opened = []
  monkeypatch.setattr(cio, "safe_open", lambda *a, **k: opened.append(a) or pytest.fail("opened a shard"))
  with pytest.raises(CheckpointError, match=rf"index.json: lists shard '{shards[-1]}'.*does not exist"):
    cio.load_pretrained(out)
  assert opened == []
  monkeypatch.undo()
  os.remove(os.path.join(out, "model.safetensors.index.json"))
  with pytest.raises(CheckpointError, match=r"no weights file.*found \['model-00001-of-.*without the index"):
    cio.open_checkpoint(out)


def test_index_inconsistent_with_shards(tmp_path, tiny_cfg, make_params):
  out = cio.save_pretrained(make_params(tiny_cfg), tiny_cfg, tmp_path / "out", max_shard_bytes=6000)
  ifile = os.path.join(out, "model.safetensors.index.json")
  index = json.load(open(ifile))
  wmap = index["weight_map"]
  name = next(n for n, f in sorted(wmap.items()) if list(wmap.values()).count(f) > 1)  # its shard stays listed
  right = wmap[name]
  index["weight_map"][name] = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
  json.dump(index, open(ifile, "w"))
  with pytest.raises(CheckpointError, match=rf"maps tensor '{name}' to .*found in {right}"):
    cio.open_checkpoint(out)


# ---- saving: atomic, never over the source, validated params ----------------------------------------------
def test_save_refuses_existing_and_source(saved, tiny_cfg, make_params, tmp_path):
  path, params = saved
  with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
    cio.save_pretrained(params, tiny_cfg, path)
  reader = cio.open_checkpoint(path)
  for src in (path, reader):
    with pytest.raises(CheckpointError, match="is the source checkpoint"):
      cio.save_pretrained(params, tiny_cfg, path, overwrite=True, source=src)
  new = make_params(tiny_cfg, seed=9)
  cio.save_pretrained(Model(params=new, config=tiny_cfg), None, path, overwrite=True, source=tmp_path / "else")
  assert_tree_bit_equal(cio.load_pretrained(path).params, new)
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp/backup directories left behind


def test_save_failure_leaves_nothing(tmp_path, tiny_cfg, make_params, monkeypatch):
  params = make_params(tiny_cfg)
  cio.save_pretrained(params, tiny_cfg, tmp_path / "keep")
  written = []

  def failing_save_file(tensors, file, metadata=None):
    written.append(file)
    if len(written) == 2:  # the second shard fails
      raise OSError("disk full")
    save_file(tensors, file, metadata=metadata)

  monkeypatch.setattr(cio, "save_file", failing_save_file)
  with pytest.raises(CheckpointError, match="disk full"):
    cio.save_pretrained(params, tiny_cfg, tmp_path / "new", max_shard_bytes=6000)
  written.clear()
  with pytest.raises(CheckpointError, match="disk full"):
    cio.save_pretrained(make_params(tiny_cfg, seed=7), tiny_cfg, tmp_path / "keep", max_shard_bytes=6000,
                        overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["keep"]
  monkeypatch.undo()
  assert_tree_bit_equal(cio.load_pretrained(tmp_path / "keep").params, params)  # the old one is intact


def test_save_validates_params(tmp_path, tiny_cfg, make_params):
  params = make_params(tiny_cfg)
  bad = dict(params, blocks=[dict(b) for b in params["blocks"]])
  bad["blocks"][1]["o"] = bad["blocks"][1]["o"][:, :-1]
  with pytest.raises(CheckpointError, match=r"blocks\[1\].o .*expected shape"):
    cio.save_pretrained(bad, tiny_cfg, tmp_path / "a")
  with pytest.raises(CheckpointError, match=r"unexpected keys \['lora'\]"):
    cio.save_pretrained(dict(params, lora=np.zeros(3)), tiny_cfg, tmp_path / "a")
  bad = dict(params, blocks=[dict(b) for b in params["blocks"]])
  bad["blocks"][0]["q"] = object()
  with pytest.raises(CheckpointError, match=r"blocks\[0\].q is a object, not a dense array"):
    cio.save_pretrained(bad, tiny_cfg, tmp_path / "a")
  assert not os.path.exists(tmp_path / "a")


# ---- tokenizer -----------------------------------------------------------------------------------------------
def _word_tokenizer(path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"<unk>": 0, "hello": 1, "world": 2, "mask": 3}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
  return path


def test_tokenizer_copied_and_loaded(tmp_path, tiny_cfg, make_params):
  tokdir = _word_tokenizer(tmp_path / "tok")
  with pytest.raises(CheckpointError, match="holds none of"):
    cio.save_pretrained(make_params(tiny_cfg), tiny_cfg, tmp_path / "x", tokenizer_from=tmp_path)
  out = cio.save_pretrained(make_params(tiny_cfg), tiny_cfg, tmp_path / "out", tokenizer_from=tokdir)
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  tok = hf_tokenizer.load_tokenizer(out)
  assert tok("hello world mask")["input_ids"] == [1, 2, 3]
  # a remote-code tokenizer class (as Dream's DreamTokenizer) falls back to tokenizer.json, no code is run
  tc = os.path.join(out, "tokenizer_config.json")
  conf = json.load(open(tc))
  conf.update(tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
                                                                            None]})
  json.dump(conf, open(tc, "w"))
  assert hf_tokenizer.load_tokenizer(out)("world hello")["input_ids"] == [2, 1]


def test_tokenizer_missing(saved):
  path, _ = saved
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    hf_tokenizer.load_tokenizer(path)
