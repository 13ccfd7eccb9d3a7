"""Tests for leo_mini_jax/porting/readers.py: safetensors (single, sharded, bf16) and torch files."""

import json
import struct
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from leo_mini_jax.porting import readers


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
      "a.bias": rng.standard_normal((5,)).astype(np.float16),
      "b.count": np.arange(4, dtype=np.int64),
      "c.bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
  }


def _assert_same(reader, tensors):
  assert sorted(reader.keys()) == sorted(tensors)
  for key, want in tensors.items():
    got = reader.get(key)
    assert reader.shape(key) == want.shape
    assert reader.dtype(key) == want.dtype
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes(), key


def test_single_safetensors_file_and_folder(tmp_path):
  tensors = _tensors()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  _assert_same(readers.open_checkpoint(tmp_path / "model.safetensors"), tensors)
  _assert_same(readers.open_checkpoint(tmp_path), tensors)


def test_bf16_bytes_match_an_independent_header_parse(tmp_path):
  """The bf16 path reads raw bytes; check them against the file's own header offsets."""
  values = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -1e4]], dtype=np.float32)
  save_file({"x": values.astype(ml_dtypes.bfloat16)}, str(tmp_path / "w.safetensors"))
  raw = open(tmp_path / "w.safetensors", "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  entry = json.loads(raw[8:8 + n])["x"]
  assert entry["dtype"] == "BF16"
  begin, end = entry["data_offsets"]
  bits = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype="<u2").reshape(2, 3)
  got = readers.open_checkpoint(tmp_path / "w.safetensors").get("x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.view(np.uint16), bits)
  # bf16 keeps the top 16 bits of the float32 (these values round exactly or nearly).
  np.testing.assert_allclose(got.astype(np.float32), values, rtol=8e-3)
  got[0, 0] = 7  # writable, unlike a view of bytes
  assert float(got[0, 0]) == 7


def test_bf16_written_by_torch_loads_exactly(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file as torch_save_file
  t = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
  torch_save_file({"w": t}, str(tmp_path / "model.safetensors"))
  got = readers.open_checkpoint(tmp_path).get("w")
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def test_sharded_safetensors_with_index(tmp_path):
  tensors = _tensors(1)
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
  weight_map = {}
  for name, ks in shards.items():
    save_file({k: tensors[k] for k in ks}, str(tmp_path / name))
    weight_map.update({k: name for k in ks})
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  reader = readers.open_checkpoint(tmp_path)
  assert isinstance(reader, readers.SafetensorsReader) and len(reader.files) == 2
  _assert_same(reader, tensors)
  # keys are grouped by shard, so streaming reads one file at a time
  files = [weight_map[k] for k in reader.keys()]
  assert files == sorted(files)


def test_index_naming_a_wrong_shard_is_rejected(tmp_path):
  save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "s1.safetensors"))
  save_file({"b": np.zeros(2, np.float32)}, str(tmp_path / "s2.safetensors"))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}, f)
  with pytest.raises(ValueError, match="'a'"):
    readers.open_checkpoint(tmp_path)


def test_missing_key_and_bad_paths_are_named(tmp_path):
  save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
  reader = readers.open_checkpoint(tmp_path)
  with pytest.raises(KeyError, match="nope"):
    reader.get("nope")
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    readers.open_checkpoint(tmp_path / "does_not_exist")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    readers.open_checkpoint(empty)
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match="weights.npz"):
    readers.open_checkpoint(tmp_path / "weights.npz")


def test_torch_bin_files(tmp_path):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  state = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).half(),
           "b": torch.randn(2, 2, generator=g).to(torch.bfloat16)}
  torch.save(state, tmp_path / "pytorch_model.bin")
  reader = readers.open_checkpoint(tmp_path)
  assert isinstance(reader, readers.TorchReader)
  assert sorted(reader.keys()) == ["b", "h", "w"]
  for k, t in state.items():
    got = reader.get(k)
    assert reader.shape(k) == tuple(t.shape)
    np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
  assert reader.dtype("b") == ml_dtypes.bfloat16 and reader.dtype("h") == np.float16
  # open_clip-style {'state_dict': ...} wrapper in a .pt file
  torch.save({"epoch": 3, "state_dict": state}, tmp_path / "other.pt")
  reader = readers.open_checkpoint(tmp_path / "other.pt")
  np.testing.assert_array_equal(reader.get("w"), state["w"].numpy())


def test_sharded_torch_bin_with_index(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-1.bin")
  torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-2.bin")
  with open(tmp_path / "pytorch_model.bin.index.json", "w") as f:
    json.dump({"weight_map": {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}}, f)
  reader = readers.open_checkpoint(tmp_path)
  np.testing.assert_array_equal(reader.get("b"), np.zeros(3, np.float32))
  np.testing.assert_array_equal(reader.get("a"), np.ones(2, np.float32))
  assert reader.shape("b") == (3,)


def test_torch_files_without_torch_name_the_file(tmp_path, monkeypatch):
  (tmp_path / "model.pt").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="model.pt.*needs torch"):
    readers.open_checkpoint(tmp_path / "model.pt")


class _Arbitrary:
  """A class torch.load(weights_only=True) must refuse to unpickle."""


def test_weights_only_refuses_arbitrary_pickles(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.ones(1), "obj": _Arbitrary()}, tmp_path / "evil.pt")
  with pytest.raises(ValueError, match=r"evil\.pt: refused.*code execution.*safetensors"):
    readers.open_checkpoint(tmp_path / "evil.pt")


class _RunsCode:
  """Unpickling this calls a function: what a malicious checkpoint does."""

  def __reduce__(self):
    return (print, ("this must never run",))


def test_code_executing_pickle_is_refused_and_never_run(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.ones(1), "payload": _RunsCode()}, tmp_path / "pytorch_model.bin")
  capsys.readouterr()
  with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused.*convert it to "
                                       r"\.safetensors"):
    readers.open_checkpoint(tmp_path)
  assert "this must never run" not in capsys.readouterr().out
  # The legacy (non-zip) serialisation goes through the same refusal.
  torch.save({"payload": _RunsCode()}, tmp_path / "legacy.pt",
             _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match=r"legacy\.pt: refused"):
    readers.open_checkpoint(tmp_path / "legacy.pt")
  assert "this must never run" not in capsys.readouterr().out


def _write_safetensors(path, header: dict, data: bytes):
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


@pytest.mark.parametrize("entries,data_size,match", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, 8,
     r"'w'.*outside the data section"),
    ({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, 16,
     r"'w'.*16 bytes.*needs 24"),
    ({"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}, 16,
     r"'w'.*needs 8"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16,
     r"'b' overlaps tensor 'a'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4,
     r"'w'.*not a list of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, r"'w'.*outside"),
    ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, 4,
     r"'w'.*unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [1]}}, 4, r"'w'.*data_offsets"),
])
def test_lying_safetensors_headers_name_the_tensor(tmp_path, entries, data_size, match):
  path = _write_safetensors(tmp_path / "model.safetensors", entries, bytes(data_size))
  with pytest.raises(ValueError, match=match):
    readers.open_checkpoint(path)


def test_truncated_safetensors_file_is_an_error(tmp_path):
  save_file({"a": np.ones((64,), np.float32)}, str(tmp_path / "full.safetensors"))
  raw = (tmp_path / "full.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
  with pytest.raises(ValueError, match=r"cut\.safetensors: tensor 'a'.*outside"):
    readers.open_checkpoint(tmp_path / "cut.safetensors")
  (tmp_path / "stub.safetensors").write_bytes(raw[:20])
  with pytest.raises(ValueError, match=r"stub\.safetensors: header length"):
    readers.open_checkpoint(tmp_path / "stub.safetensors")
