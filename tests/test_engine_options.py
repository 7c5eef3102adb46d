"""Engine options (``additional_config={"vllm_steer": {...}}``): how vectors reach the
workers (``transport``: the content-addressed store or inline) and the projection
capacity (``max_projections``), on two engines over one tiny random llama."""

from __future__ import annotations

import pytest

from tests.arch_check import write_vectors
from tests.steer_helpers import env_registry
from vllm_steer.fixtures.engines import inproc_engine, make_test_llm, shutdown
from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS, build_tiny_model
from vllm_steer.steering.options import EngineOptions, OptionError


class _Cfg:
    def __init__(self, opts):
        self.additional_config = {"vllm_steer": opts}


@pytest.mark.parametrize("opts, message", [
    ({"max_projections": -1}, "max_projections"), ({"max_projections": 9}, "max_projections"),
    ({"max_projections": True}, "max_projections"), ({"transport": "pigeon"}, "transport"),
    ({"colour": "blue"}, "colour"), ("store", "mapping")])
def test_bad_options_are_named(opts, message):
    with pytest.raises(OptionError, match=message):
        EngineOptions.from_vllm_config(_Cfg(opts))


def test_option_defaults_and_auto_transport():
    o = EngineOptions.from_vllm_config(_Cfg({}))
    assert (o.max_projections, o.transport) == (1, "auto")
    assert o.resolved_transport("ray") == "inline" and o.resolved_transport("mp") == "store"
    assert EngineOptions.from_vllm_config(_Cfg({"transport": "store"})).resolved_transport(
        "ray") == "store"


@pytest.fixture(scope="module")
def engines(default_model_dir, tmp_path_factory):
    model_dir = build_tiny_model("llama", default_model_dir)
    reg = write_vectors(tmp_path_factory.mktemp("options"), HIDDEN, LAYERS)
    env_registry(reg)
    made = []
    try:
        with inproc_engine():
            for opts in ({"transport": "inline", "max_projections": 0},
                         {"transport": "store", "max_projections": 2}):
                made.append(make_test_llm(str(model_dir), max_model_len=512,
                                          additional_config={"vllm_steer": opts}))
        yield made
    finally:
        for llm in made:
            shutdown(llm)


def _run(llm, spec, n=8):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                        extra_args={"steering": spec} if spec else None)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], sp, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


@pytest.mark.engine
def test_inline_and_store_transports_steer_identically(engines):
    inline, store = engines
    spec = {"vectors": [{"name": "a", "scale": 1.0}, {"name": "b", "scale": -0.5}]}
    assert _run(inline, spec) == _run(store, spec) != _run(store, None)
    _run(inline, None)   # one more step: finished requests release their slots
    _run(store, None)
    (si,) = inline.collective_rpc("vllm_steer_stats")
    (ss,) = store.collective_rpc("vllm_steer_stats")
    assert si["inline_vectors"] >= 2 and si["store_reads"] == 0
    assert ss["store_reads"] >= 2 and ss["inline_vectors"] == 0
    assert si["max_projections"] == 0 and ss["max_projections"] == 2
    assert si["bytes_per_slot"] < ss["bytes_per_slot"]   # no projection tables at K = 0


@pytest.mark.engine
def test_projection_capacity_is_the_engines(engines):
    from vllm.exceptions import VLLMValidationError

    add_only, two = engines
    ablate = {"vectors": [{"name": "a", "op": "ablate"}]}
    with pytest.raises(VLLMValidationError, match="max_projections") as ei:
        _run(add_only, ablate)
    assert ei.value.parameter == "steering.vectors"
    with pytest.raises(VLLMValidationError) as ei:
        _run(add_only, {"vectors": [{"name": "a"}], "normalize": True})
    assert ei.value.parameter == "steering.normalize"
    both = {"vectors": [{"name": "a", "op": "ablate"}, {"name": "b", "op": "clamp",
                                                        "value": 1.0}]}
    assert _run(two, both) != _run(two, None)      # two projections on the same layers fit
    three = {"vectors": both["vectors"] + [{"name": "a", "op": "ablate", "strength": 0.5}]}
    with pytest.raises(VLLMValidationError, match="3 ablate/clamp"):
        _run(two, three)
