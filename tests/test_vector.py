"""SteeringVector: arithmetic and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_steer import SteeringVector, SteeringVectorError, VectorMetadata

H = 6


def vec(layers: dict[int, list[float]], **meta) -> SteeringVector:
    return SteeringVector({k: torch.tensor(v) for k, v in layers.items()}, VectorMetadata(**meta))


def ramp(start: float) -> list[float]:
    return [float(start + i) for i in range(H)]


# -- construction -------------------------------------------------------------------------
def test_directions_are_float32_sorted_and_copied():
    src = torch.arange(3 * H, dtype=torch.float32).reshape(3, H)
    v = SteeringVector({5: src[2], 1: src[0], 3: src[1].double()})
    assert v.layers == [1, 3, 5]
    assert v.hidden_size == H
    assert all(t.dtype == torch.float32 for t in v.directions.values())
    assert torch.equal(v.directions[5], torch.arange(2 * H, 3 * H, dtype=torch.float32))
    src.zero_()  # a vector never aliases the caller's tensors
    assert float(v.directions[5].sum()) == float(sum(range(2 * H, 3 * H)))
    assert v.metadata.created_by.startswith("vllm-steer")


def test_layer_index_numpy_int_accepted_bool_and_str_rejected():
    v = SteeringVector({np.int64(2): torch.ones(H)})
    assert v.layers == [2] and type(v.layers[0]) is int
    with pytest.raises(SteeringVectorError, match="layer index must be an int, got True"):
        SteeringVector({True: torch.ones(H)})
    with pytest.raises(SteeringVectorError, match="layer index must be an int, got '3'"):
        SteeringVector({"3": torch.ones(H)})


def test_equality_is_identity_and_hashable():
    a = vec({1: ramp(0)})
    b = a * 1.0
    assert a == a and a != b  # must not raise "Boolean value of Tensor ... ambiguous"
    assert len({a, b}) == 2
    assert a.allclose(b)


# -- arithmetic ---------------------------------------------------------------------------
def test_add_is_layerwise_on_union_of_layers():
    a = vec({1: ramp(0), 3: ramp(10)})
    b = vec({3: ramp(100), 7: ramp(-5)})
    c = a + b
    assert c.layers == [1, 3, 7]
    torch.testing.assert_close(c.directions[1], torch.tensor(ramp(0)))
    torch.testing.assert_close(c.directions[3], torch.tensor(ramp(10)) + torch.tensor(ramp(100)))
    torch.testing.assert_close(c.directions[7], torch.tensor(ramp(-5)))
    assert c.metadata.method == "combined"
    # operands are untouched
    torch.testing.assert_close(a.directions[3], torch.tensor(ramp(10)))
    assert b.layers == [3, 7]


def test_sub_and_neg():
    a = vec({1: ramp(0), 3: ramp(10)})
    b = vec({3: ramp(1), 4: ramp(2)})
    d = a - b
    assert d.layers == [1, 3, 4]
    torch.testing.assert_close(d.directions[1], torch.tensor(ramp(0)))
    torch.testing.assert_close(d.directions[3], torch.full((H,), 9.0))
    torch.testing.assert_close(d.directions[4], -torch.tensor(ramp(2)))
    n = -a
    assert n.layers == a.layers
    torch.testing.assert_close(n.directions[3], -torch.tensor(ramp(10)))
    assert (a - a).allclose(a * 0.0)
    assert (a + (-a)).allclose(a * 0)


def test_scalar_multiplication_and_division():
    a = vec({2: ramp(1)}, method="mean_diff")
    for s in (2, 2.5, -0.5, np.float32(3.0)):
        for r in (a * s, s * a):
            torch.testing.assert_close(r.directions[2], torch.tensor(ramp(1)) * float(s))
            assert r.metadata.method == "mean_diff"
    torch.testing.assert_close((a / 4).directions[2], torch.tensor(ramp(1)) / 4)


def test_scalar_multiplication_rejects_nonfinite_and_non_scalars():
    a = vec({2: ramp(1)})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(SteeringVectorError, match="scale must be finite"):
            a * bad
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(TypeError):
        a * True
    with pytest.raises(TypeError):
        a + 1.0


def test_overflow_to_inf_is_caught():
    a = vec({2: [3e38] * H})
    with pytest.raises(SteeringVectorError, match="layer 2 contains NaN or inf"):
        a * 10


def test_combining_different_hidden_sizes_is_refused():
    with pytest.raises(SteeringVectorError, match="hidden size 6 and 4"):
        vec({1: ramp(0)}) + vec({1: [1.0, 2.0, 3.0, 4.0]})


def test_select_layers_and_to_dense():
    a = vec({1: ramp(0), 3: ramp(10), 5: ramp(20)})
    s = a.select_layers([3, 5, 9])
    assert s.layers == [3, 5]
    with pytest.raises(SteeringVectorError, match=r"none of layers \[8, 9\]"):
        a.select_layers([8, 9])
    dense = a.to_dense(6)
    assert dense.shape == (6, H)
    assert torch.equal(dense[0], torch.zeros(H)) and torch.equal(dense[4], torch.zeros(H))
    assert torch.equal(dense[3], torch.tensor(ramp(10)))
    with pytest.raises(SteeringVectorError, match="out of range"):
        a.to_dense(5)


# -- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_values_rejected(bad):
    values = ramp(0)
    values[3] = bad
    with pytest.raises(SteeringVectorError, match="layer 4 contains NaN or inf"):
        vec({1: ramp(0), 4: values})


def test_mixed_hidden_sizes_rejected():
    with pytest.raises(SteeringVectorError, match=r"different hidden sizes \[4, 6\]"):
        vec({1: ramp(0), 2: [0.0, 1.0, 2.0, 3.0]})


def test_negative_layer_rejected():
    with pytest.raises(SteeringVectorError, match="layer -1 is negative"):
        vec({-1: ramp(0), 2: ramp(0)})


def test_empty_and_non_1d_rejected():
    with pytest.raises(SteeringVectorError, match="vector has no layers"):
        SteeringVector({})
    with pytest.raises(SteeringVectorError, match=r"layer 2 has shape \(2, 3\), expected"):
        SteeringVector({2: torch.zeros(2, 3)})
    with pytest.raises(SteeringVectorError, match=r"layer 2 has shape \(\), expected \[hidden\]"):
        SteeringVector({2: torch.tensor(1.0)})


def test_metadata_hidden_size_must_match_directions():
    with pytest.raises(SteeringVectorError, match="metadata hidden_size=8 but directions have 6"):
        vec({1: ramp(0)}, hidden_size=8)
    assert vec({1: ramp(0)}, hidden_size=H).hidden_size == H


def test_validate_against_model_hidden_size():
    v = vec({1: ramp(0)})
    v.validate(hidden_size=H)
    with pytest.raises(
        SteeringVectorError,
        match=r"model\.gguf: hidden size 6 does not match the model's hidden size 576",
    ):
        v.validate(hidden_size=576, where="model.gguf")


def test_validate_layers_in_range():
    v = vec({0: ramp(0), 29: ramp(0), 30: ramp(0), 31: ramp(0)})
    v.validate(num_layers=32)
    with pytest.raises(
        SteeringVectorError,
        match=r"layers \[30, 31\] out of range for a model with 30 layers \(valid: 0\.\.29\)",
    ):
        v.validate(num_layers=30)


def test_metadata_dict_round_trip_and_bad_int():
    m = VectorMetadata(
        model_name="m", architecture="llama", hidden_size=6, num_layers=30, method="pca",
        dataset_fingerprint="abc", created_by="me", extra={"coeff": "1.5", "note": "x.y"},
    )
    d = m.to_dict()
    assert all(isinstance(k, str) and isinstance(val, str) for k, val in d.items())
    assert VectorMetadata.from_dict(d) == m
    with pytest.raises(SteeringVectorError, match="'num_layers' is not an integer: 'thirty'"):
        VectorMetadata.from_dict({"num_layers": "thirty"})
