"""Scale and layer validation: one implementation for specs, the registry and uploads."""

from __future__ import annotations

import json
import math

import pytest

from vllm_steer.steering.registry import Registry, RegistryError
from vllm_steer.steering.spec import parse_extra_args, parse_spec
from vllm_steer.steering.values import SpecError, parse_flag, parse_layers, parse_scale


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


@pytest.mark.parametrize("raw, text, want", [([3, 1, 2], False, (1, 2, 3)),
                                             ((4, 0), False, (0, 4)),
                                             ([3, 1, 2], True, (1, 2, 3)),
                                             ("8,9,10", True, (8, 9, 10)),
                                             ("10", True, (10,))])
def test_layer_lists_in_every_accepted_form(raw, text, want):
    assert parse_layers(raw, "layers", text=text) == want


@pytest.mark.parametrize("bad, message", [([], "non-empty"), ([1, 1], "repeat"),
                                          ([-1], "negative"), ([True], "not an integer"),
                                          ("one", "list of layer"), ([30], "out of range"),
                                          ("10", "got the string"), ("8,9", "got the string"),
                                          ("[4, 0]", "got the string")])
def test_bad_layer_lists(bad, message):
    with pytest.raises(SpecError, match=message):
        parse_layers(bad, "layers", num_layers=30)


@pytest.mark.parametrize("bad", ["[4, 0]", "one", "8;9", "", "8,,9"])
def test_text_layer_lists_are_comma_separated_integers_only(bad):
    with pytest.raises(SpecError, match="comma-separated"):
        parse_layers(bad, "layers", text=True)


# -- typed carriers take JSON types, the text carriers (query, flat shorthand) spellings ----
@pytest.mark.parametrize("value", ["yes", "no", "true", "1", 1, 0, None, [], "True"])
def test_flags_in_typed_carriers_are_booleans_only(value):
    with pytest.raises(SpecError, match="JSON boolean"):
        parse_flag(value, "replace")


@pytest.mark.parametrize("value, want", [(True, True), (False, False), ("true", True),
                                         ("FALSE", False), ("1", True), ("0", False),
                                         (1, True), (0, False)])
def test_flags_in_text_carriers_take_the_documented_spellings(value, want):
    assert parse_flag(value, "replace", text=True) is want


@pytest.mark.parametrize("value", ["yes", "no", "on", "", 2, 1.0, None])
def test_other_flag_spellings_are_refused_in_text_carriers(value):
    with pytest.raises(SpecError, match="'true', 'false', '1', '0'"):
        parse_flag(value, "replace", text=True)


def test_numbers_in_typed_carriers_are_numbers_only():
    with pytest.raises(SpecError, match="must be a number, got '1.5'"):
        parse_scale("1.5", "scale")
    assert parse_scale("1.5", "scale", text=True) == 1.5
    assert parse_scale(2, "scale") == 2.0


@pytest.mark.parametrize("field, value, where", [
    ("normalize", "true", "steering.normalize"),
    ("normalize", 1, "steering.normalize"),
    ("scale", "1.5", "steering.vectors[0].scale"),
    ("layers", "10", "steering.vectors[0].layers"),
    ("strength", "0.5", "steering.vectors[0].strength"),
])
def test_the_spec_object_is_typed(field, value, where):
    vec: dict = {"name": "v"}
    spec: dict = {"vectors": [vec]}
    if field == "normalize":
        spec[field] = value
    else:
        vec[field] = value
        if field == "strength":
            vec["op"] = "ablate"
    with pytest.raises(SpecError) as ei:
        parse_spec(spec)
    assert ei.value.field == where
    with pytest.raises(SpecError):  # the same spec as the JSON string of vllm_xargs
        parse_spec(json.dumps(spec))


def test_the_flat_shorthand_is_text():
    spec = parse_extra_args({"steer": "a,b", "steer_layers": "8,9", "steer_scale": "1.5",
                             "steer_normalize": "true"})
    assert [v.name for v in spec.vectors] == ["a", "b"]
    assert spec.vectors[0].layers == (8, 9) and spec.vectors[0].scale == 1.5 and spec.normalize
    # vLLM's vllm_xargs turns a JSON true into 1
    assert parse_extra_args({"steer": "a", "steer_normalize": 1}).normalize
    with pytest.raises(SpecError) as ei:
        parse_extra_args({"steer": "a", "steer_normalize": "yes"})
    assert ei.value.field == "steer_normalize"


@pytest.mark.parametrize("entry, field", [("{path: v.st, layers: '10'}", "layers"),
                                          ("{path: v.st, layers: '8,9'}", "layers"),
                                          ("{path: v.st, scale: '2'}", "scale")])
def test_the_registry_file_is_typed(tmp_path, entry, field):
    with pytest.raises(RegistryError, match=rf"vectors\.v\.{field}"):
        Registry.from_yaml(_write(tmp_path, f"vectors:\n  v: {entry}\n"))


def test_registry_layers_are_validated(tmp_path):
    with pytest.raises(RegistryError, match=r"vectors\.v\.layers.*repeat"):
        Registry.from_yaml(_write(tmp_path, "vectors:\n  v: {path: v.st, layers: [1, 1]}\n"))
