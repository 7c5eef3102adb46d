"""Scale and layer validation: one implementation for specs, the registry and uploads."""

from __future__ import annotations

import math

import pytest

from vllm_steer.steering.registry import Registry, RegistryError
from vllm_steer.steering.spec import parse_spec
from vllm_steer.steering.values import SpecError, parse_layers, parse_scale


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "nan", "1e999", 1001, True,
                                 [1.0], "lots"])
def test_bad_scales_are_refused_everywhere(bad, tmp_path):
    with pytest.raises(SpecError) as ei:
        parse_scale(bad, "x.scale")
    assert ei.value.field == "x.scale"
    # the spec edge
    with pytest.raises(SpecError, match="scale"):
        parse_spec({"vectors": [{"name": "v", "scale": bad}]})
    # the registry file (NaN and inf scales used to load)
    reg = tmp_path / "registry.yaml"
    reg.write_text(f"vectors:\n  v: {{path: v.safetensors, scale: {_yaml(bad)}}}\n")
    with pytest.raises(RegistryError, match=r"vectors\.v\.scale"):
        Registry.from_yaml(reg)


def _yaml(x) -> str:
    if isinstance(x, float) and math.isnan(x):
        return ".nan"
    if isinstance(x, float) and math.isinf(x):
        return ".inf"
    if x is None:
        return "null"
    return repr(x) if not isinstance(x, str) else f'"{x}"'


def test_runtime_registration_checks_the_scale_too(tmp_path):
    reg = Registry.from_yaml(_write(tmp_path, "vectors: {}\n"))
    with pytest.raises(RegistryError, match="scale"):
        reg.register("v", tmp_path / "v.safetensors", scale=float("nan"))


def _write(tmp_path, text: str):
    p = tmp_path / "registry.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("raw, want", [([3, 1, 2], (1, 2, 3)), ("[4, 0]", (0, 4)),
                                       ("8,9,10", (8, 9, 10))])
def test_layer_lists_in_every_accepted_form(raw, want):
    assert parse_layers(raw, "layers") == want


@pytest.mark.parametrize("bad, message", [([], "non-empty"), ([1, 1], "repeat"),
                                          ([-1], "negative"), ([True], "not an integer"),
                                          ("one", "list of layer"), ([30], "out of range")])
def test_bad_layer_lists(bad, message):
    with pytest.raises(SpecError, match=message):
        parse_layers(bad, "layers", num_layers=30)


def test_registry_layers_are_validated(tmp_path):
    with pytest.raises(RegistryError, match=r"vectors\.v\.layers.*repeat"):
        Registry.from_yaml(_write(tmp_path, "vectors:\n  v: {path: v.st, layers: [1, 1]}\n"))
