"""Vector files: safetensors and llama.cpp GGUF, round trips, interop and bad files."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vllm_steer import SteeringVector, VectorMetadata, cli, vector_io
from vllm_steer.vector import load, save
from vllm_steer.vector_errors import VectorFileError
from vllm_steer.vector_io import detect_format

H = 16


def make_vector(layers=(1, 5, 29), *, seed: int = 0, **meta) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    meta.setdefault("architecture", "llama")
    return SteeringVector(
        {layer: torch.randn(H, generator=g) for layer in layers}, VectorMetadata(**meta)
    )


def assert_bad_file(path, pattern: str) -> VectorFileError:
    """Loading ``path`` raises VectorFileError naming the file and matching ``pattern``."""
    with pytest.raises(VectorFileError) as ei:
        load(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
    assert ei.value.path == str(path)
    return ei.value


def write_gguf(path, tensors: dict[str, np.ndarray], *, arch="controlvector", kv=None) -> None:
    """A GGUF written with gguf.GGUFWriter directly, the way repeng's export_gguf does."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def repeng_gguf(path, directions: dict[int, np.ndarray], hint: str = "llama") -> None:
    write_gguf(
        path,
        {f"direction.{layer}": arr for layer, arr in directions.items()},
        kv={"controlvector.model_hint": hint, "controlvector.layer_count": len(directions)},
    )


def no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if ".tmp" in p.name]


# -- safetensors --------------------------------------------------------------------------
def test_safetensors_round_trip_values_and_metadata(tmp_path):
    v = make_vector(
        model_name="SmolLM2-135M-Instruct", num_layers=30, method="pca_diff",
        dataset_fingerprint="sha256:abc", extra={"coeff": "2.5", "prompt": "Be happy."},
    )
    path = tmp_path / "happy.safetensors"
    v.save(str(path))
    assert detect_format(path) == "safetensors"
    w = SteeringVector.load(str(path))
    assert w.layers == [1, 5, 29]
    for layer in v.layers:
        assert torch.equal(w.directions[layer], v.directions[layer])  # bit-exact
    assert w.metadata == VectorMetadata(
        model_name="SmolLM2-135M-Instruct", architecture="llama", hidden_size=H, num_layers=30,
        method="pca_diff", dataset_fingerprint="sha256:abc", created_by=v.metadata.created_by,
        extra={"coeff": "2.5", "prompt": "Be happy."},
    )
    no_leftovers(tmp_path)


def test_safetensors_layout_is_plain(tmp_path):
    """Other tools can read our files: direction.N F32 tensors and string metadata."""
    from safetensors import safe_open

    path = tmp_path / "v.safetensors"
    save(make_vector(), path)
    with safe_open(str(path), framework="np") as f:
        assert sorted(f.keys()) == ["direction.1", "direction.29", "direction.5"]
        assert f.get_tensor("direction.5").dtype == np.float32
        meta = f.metadata()
    assert meta["format"] == "vllm-steer-vector"
    assert json.loads(meta["layers"]) == [1, 5, 29]
    assert meta["hidden_size"] == str(H)


def test_safetensors_half_precision_file_is_loaded_as_float32(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({"direction.3": torch.ones(H, dtype=torch.float16)}, str(path))
    v = load(path)
    assert v.layers == [3] and v.directions[3].dtype == torch.float32
    assert torch.equal(v.directions[3], torch.ones(H))


# -- GGUF ---------------------------------------------------------------------------------
def test_gguf_round_trip(tmp_path):
    v = make_vector(model_name="SmolLM2", num_layers=30, method="pca", extra={"k": "v"})
    path = tmp_path / "v.gguf"
    v.save(str(path))
    assert detect_format(path) == "gguf"
    w = load(path)
    assert w.layers == v.layers
    for layer in v.layers:
        assert torch.equal(w.directions[layer], v.directions[layer])
    assert w.metadata.architecture == "llama"
    assert w.metadata.model_name == "SmolLM2"
    assert w.metadata.num_layers == 30
    assert w.metadata.hidden_size == H
    assert w.metadata.method == "pca"
    assert w.metadata.extra == {"k": "v"}
    no_leftovers(tmp_path)


def test_gguf_is_what_llama_cpp_reads(tmp_path):
    """The invariants llama.cpp's control-vector loader checks, read back with GGUFReader."""
    v = make_vector(layers=(1, 2, 17))
    path = tmp_path / "v.gguf"
    save(v, path)
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.get_field(name)
        assert f is not None, f"missing {name}"
        return f

    arch = field("general.architecture")
    assert arch.types == [gguf.GGUFValueType.STRING]
    assert arch.contents() == "controlvector"
    hint = field("controlvector.model_hint")
    assert hint.types == [gguf.GGUFValueType.STRING]
    assert hint.contents() == "llama"
    count = field("controlvector.layer_count")
    assert count.types == [gguf.GGUFValueType.UINT32]
    assert count.contents() == len(reader.tensors) == 3

    names = []
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        assert m and int(m.group(1)) >= 1, t.name
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert len(t.shape) == 1 and int(t.shape[0]) == H  # 1-D, n_embd
        layer = int(m.group(1))
        np.testing.assert_array_equal(np.asarray(t.data), v.directions[layer].numpy())
        names.append(t.name)
    assert sorted(names) == ["direction.1", "direction.17", "direction.2"]


def test_import_repeng_style_gguf(tmp_path):
    rng = np.random.default_rng(0)
    dirs = {layer: rng.standard_normal(H).astype(np.float32) for layer in (3, 4, 10)}
    path = tmp_path / "repeng.gguf"
    repeng_gguf(path, dirs, hint="llama")
    v = load(path)
    assert v.layers == [3, 4, 10]
    for layer, arr in dirs.items():
        np.testing.assert_array_equal(v.directions[layer].numpy(), arr)
    assert v.metadata.architecture == "llama"
    assert v.hidden_size == H


def test_import_accepts_direction_0(tmp_path):
    path = tmp_path / "zero.gguf"
    repeng_gguf(path, {0: np.ones(H, np.float32), 1: np.zeros(H, np.float32)})
    assert load(path).layers == [0, 1]


def test_export_refuses_layer0_unless_dropped(tmp_path):
    v = make_vector(layers=(0, 3))
    path = tmp_path / "v.gguf"
    with pytest.raises(VectorFileError, match="steers layer 0") as ei:
        save(v, path)
    assert str(path) in str(ei.value) and "drop_layer0" in str(ei.value)
    assert not path.exists()
    no_leftovers(tmp_path)

    with pytest.warns(UserWarning, match="layer 0 dropped"):
        save(v, path, drop_layer0=True)
    w = load(path)
    assert w.layers == [3]
    assert torch.equal(w.directions[3], v.directions[3])
    assert [t.name for t in gguf.GGUFReader(str(path)).tensors] == ["direction.3"]

    with pytest.raises(VectorFileError, match="only steers layer 0"), pytest.warns(UserWarning):
        save(make_vector(layers=(0,)), tmp_path / "only0.gguf", drop_layer0=True)
    # safetensors holds layer 0 without complaint
    save(v, tmp_path / "v.safetensors")
    assert load(tmp_path / "v.safetensors").layers == [0, 3]


def test_format_is_detected_from_content_not_extension(tmp_path):
    v = make_vector()
    gguf_as_bin = tmp_path / "vector.safetensors"
    vector_io.save_gguf(v, gguf_as_bin)
    assert detect_format(gguf_as_bin) == "gguf"
    st_as_gguf = tmp_path / "vector.gguf"
    vector_io.save_safetensors(v, st_as_gguf)
    assert detect_format(st_as_gguf) == "safetensors"
    assert load(gguf_as_bin).allclose(v) and load(st_as_gguf).allclose(v)
    save(v, tmp_path / "UPPER.GGUF")
    assert detect_format(tmp_path / "UPPER.GGUF") == "gguf"


# -- bad files ----------------------------------------------------------------------------
def test_missing_file_and_directory(tmp_path):
    assert_bad_file(tmp_path / "nope.safetensors", "no such file")
    assert_bad_file(tmp_path, "not a regular file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_bad_file(path, "unknown format")


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(1234)
    path = tmp_path / "random.gguf"
    data = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data[8] = ord("x")  # not a safetensors header by chance
    path.write_bytes(bytes(data))
    assert_bad_file(path, "unknown format")
    # random bytes behind each format's magic
    gg = tmp_path / "random_gguf.gguf"
    gg.write_bytes(b"GGUF" + bytes(data))
    assert_bad_file(gg, "cannot read GGUF file")
    st = tmp_path / "random_st.safetensors"
    st.write_bytes(struct.pack("<Q", 100) + b"{" + bytes(data[:200]))
    assert_bad_file(st, "cannot read safetensors file")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_truncated_safetensors(tmp_path, keep):
    full = tmp_path / "full.safetensors"
    save(make_vector(), full)
    data = full.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    assert_bad_file(path, "truncated|cannot read safetensors")


@pytest.mark.parametrize("keep", [0.002, 0.1, 0.5, 0.9, -1])
def test_truncated_gguf(tmp_path, keep):
    full = tmp_path / "full.gguf"
    save(make_vector(), full)
    data = full.read_bytes()
    cut = len(data) - 1 if keep == -1 else max(4, int(len(data) * keep))
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    assert_bad_file(path, "cannot read GGUF file, truncated or corrupt")


def test_nan_in_safetensors(tmp_path):
    t = torch.ones(H)
    t[7] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({"direction.1": torch.ones(H), "direction.2": t}, str(path))
    assert_bad_file(path, r"direction\.2 contains NaN or inf")


def test_inf_in_gguf(tmp_path):
    arr = np.ones(H, np.float32)
    arr[0] = np.inf
    path = tmp_path / "inf.gguf"
    repeng_gguf(path, {4: arr})
    assert_bad_file(path, r"direction\.4 contains NaN or inf")


def test_2d_tensor_safetensors(tmp_path):
    path = tmp_path / "2d.safetensors"
    save_file({"direction.1": torch.ones(2, H)}, str(path))
    assert_bad_file(path, r"direction\.1 has shape \(2, 16\), expected \[hidden\]")


def test_2d_tensor_gguf(tmp_path):
    path = tmp_path / "2d.gguf"
    repeng_gguf(path, {1: np.ones((2, H), np.float32)})
    assert_bad_file(path, r"tensor direction\.1 has shape \(2, 16\), expected 1-D")


def test_non_f32_gguf_tensor(tmp_path):
    path = tmp_path / "f16.gguf"
    repeng_gguf(path, {1: np.ones(H, np.float16)})
    assert gguf.GGUFReader(str(path)).tensors[0].tensor_type == gguf.GGMLQuantizationType.F16
    assert_bad_file(path, r"tensor direction\.1 is F16, expected F32")


def test_integer_safetensors_tensor(tmp_path):
    path = tmp_path / "int.safetensors"
    save_file({"direction.1": torch.ones(H, dtype=torch.int32)}, str(path))
    assert_bad_file(path, r"direction\.1 has dtype torch\.int32, expected float")


@pytest.mark.parametrize("name", ["direction.x", "layers.1", "direction.-1", "direction.1.weight"])
def test_wrong_tensor_names(tmp_path, name):
    st = tmp_path / "names.safetensors"
    save_file({"direction.2": torch.ones(H), name: torch.ones(H)}, str(st))
    assert_bad_file(st, f"unexpected tensor '{re.escape(name)}' \\(expected direction\\.N\\)")
    gg = tmp_path / "names.gguf"
    write_gguf(gg, {"direction.2": np.ones(H, np.float32), name: np.ones(H, np.float32)})
    assert_bad_file(gg, f"unexpected tensor '{re.escape(name)}'")


def test_repeated_layer_rejected(tmp_path):
    path = tmp_path / "dup.gguf"
    ones = np.ones(H, np.float32)
    write_gguf(path, {"direction.1": ones, "direction.01": ones})
    assert_bad_file(path, "repeats layer 1")


def test_no_tensors(tmp_path):
    gg = tmp_path / "none.gguf"
    write_gguf(gg, {}, kv={"controlvector.layer_count": 0})
    assert_bad_file(gg, "no direction.N tensors")


def test_mixed_hidden_sizes_in_file(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"direction.1": torch.ones(H), "direction.2": torch.ones(H + 1)}, str(path))
    assert_bad_file(path, r"different hidden sizes \[16, 17\]")


def test_bad_metadata_in_file(tmp_path):
    path = tmp_path / "meta.safetensors"
    save_file({"direction.1": torch.ones(H)}, str(path), metadata={"hidden_size": "32"})
    assert_bad_file(path, "metadata hidden_size=32 but directions have 16")
    save_file({"direction.1": torch.ones(H)}, str(path), metadata={"num_layers": "many"})
    assert_bad_file(path, "'num_layers' is not an integer")


def test_gguf_with_other_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, {"direction.1": np.ones(H, np.float32)}, arch="llama")
    assert_bad_file(path, "GGUF architecture is 'llama', not 'controlvector'")


def test_pickle_and_torch_save_are_rejected_without_unpickling(tmp_path, monkeypatch):
    tensors = {"direction.1": torch.ones(H)}
    files = {
        "pickle.safetensors": pickle.dumps(tensors),
        "pickle.gguf": pickle.dumps(tensors, protocol=2),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(tensors, tmp_path / "torch_zip.pt")
    torch.save(tensors, tmp_path / "torch_legacy.bin", _use_new_zipfile_serialization=False)
    good = tmp_path / "good.safetensors"
    save(make_vector(), good)
    save(make_vector(), tmp_path / "good.gguf")

    def forbidden(*args, **kwargs):
        raise AssertionError("vector loading must never unpickle")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(np, "load", forbidden)

    for name in ("pickle.safetensors", "pickle.gguf", "torch_zip.pt", "torch_legacy.bin"):
        assert_bad_file(tmp_path / name, "unknown format: neither safetensors nor GGUF")
    assert load(good).layers == [1, 5, 29]
    assert load(tmp_path / "good.gguf").layers == [1, 5, 29]


# -- CLI ----------------------------------------------------------------------------------
def test_cli_info(tmp_path, capsys):
    v = make_vector(method="pca")
    path = tmp_path / "v.gguf"
    save(v, path)
    assert cli.main(["vector", "info", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "gguf"
    assert out["layers"] == [1, 5, 29]
    assert out["hidden_size"] == H
    assert out["metadata"]["method"] == "pca"
    assert out["norms"]["5"] == pytest.approx(float(v.directions[5].norm()), abs=1e-5)


def test_cli_info_on_a_repeng_gguf_reports_its_origin_and_sizes(tmp_path, capsys):
    """A GGUF written by repeng / llama.cpp carries no vllm-steer metadata: info must not
    claim vllm-steer made it, and gives the real hidden size (the model's depth is not in
    the file: null, not 0)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "repeng.gguf"
    repeng_gguf(path, {layer: rng.standard_normal(H).astype(np.float32) for layer in (3, 4)})
    assert cli.main(["vector", "info", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = out["metadata"]
    assert meta["created_by"] == "unknown"
    assert meta["hidden_size"] == H and out["hidden_size"] == H
    assert meta["num_layers"] is None
    assert meta["architecture"] == "llama"
    assert load(path).metadata.created_by == "unknown"
    # a file vllm-steer wrote keeps its own origin and sizes, as numbers
    save(make_vector(num_layers=30), tmp_path / "ours.gguf")
    assert cli.main(["vector", "info", str(tmp_path / "ours.gguf")]) == 0
    meta = json.loads(capsys.readouterr().out)["metadata"]
    assert meta["created_by"].startswith("vllm-steer ") and meta["num_layers"] == 30
    assert meta["hidden_size"] == H


def test_cli_info_bad_file(tmp_path, capsys):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a vector at all")
    assert cli.main(["vector", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "unknown format" in err


def test_cli_convert_round_trip(tmp_path, capsys):
    v = make_vector(layers=(0, 2, 7), extra={"a": "b"})
    src = tmp_path / "v.safetensors"
    save(v, src)
    gg = tmp_path / "out" / "v.gguf"
    assert cli.main(["vector", "convert", str(src), str(gg)]) == 2
    assert "--drop-layer0" in capsys.readouterr().err
    assert not gg.exists()
    with pytest.warns(UserWarning, match="layer 0 dropped"):
        assert cli.main(["vector", "convert", str(src), str(gg), "--drop-layer0"]) == 0
    assert capsys.readouterr().out.strip() == str(gg)
    back = tmp_path / "back.safetensors"
    assert cli.main(["vector", "convert", str(gg), str(back)]) == 0
    w = load(back)
    assert detect_format(back) == "safetensors"
    assert w.allclose(v.select_layers([2, 7]), atol=0)
    assert w.metadata.extra == {"a": "b"} and w.metadata.architecture == "llama"


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "v.safetensors"
    save(make_vector(seed=1), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(make_vector(seed=2), path)
    assert path.read_bytes() == before
    no_leftovers(tmp_path)
    assert os.listdir(tmp_path) == ["v.safetensors"]
