"""The vLLM adapter: the symbol table is checked against the installed vLLM, and a missing
or changed symbol fails plugin load with an error naming it and the supported range.
No engine is started here; the engine tests run the patched runner for real."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

from vllm_steer import plugin
from vllm_steer.compat import TESTED_RANGE, installed_vllm_version
from vllm_steer.vllm_adapter import runner
from vllm_steer.vllm_adapter.check import VLLMDriftError, check_all, check_instance
from vllm_steer.vllm_adapter.symbols import SYMBOLS

GPU = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


@pytest.fixture()
def vllm_classes():
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return types.SimpleNamespace(gpu=GPUModelRunner, cpu=CPUModelRunner, proc=InputProcessor)


def drift(symbols=None) -> VLLMDriftError:
    with pytest.raises(VLLMDriftError) as ei:
        check_all(symbols)
    return ei.value


def assert_names(err: VLLMDriftError, symbol: str, problem: str) -> None:
    assert err.symbol == symbol, err.failures
    text = str(err)
    assert symbol in text and problem in text
    assert TESTED_RANGE in text and str(installed_vllm_version()) in text


def test_installed_vllm_passes_every_check():
    checked = check_all() + check_all(scope="api")
    assert {s.target for s in checked} == {s.target for s in SYMBOLS}  # CPU: all apply
    assert len({s.target for s in SYMBOLS}) == len(SYMBOLS)           # one row per symbol


def test_the_table_covers_every_patch_the_adapter_installs():
    targets = {s.target for s in SYMBOLS if s.kind == "patched"}
    for name in ("load_model", "_update_states", "_prepare_inputs"):
        assert f"{GPU}.{name}" in targets
    assert "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model" in targets
    assert "vllm.v1.engine.input_processor:InputProcessor.process_inputs" in targets
    assert "vllm.v1.engine.input_processor:InputProcessor.__init__" in targets
    assert "vllm.v1.worker.worker_base:WorkerBase" in targets
    assert "vllm.v1.sample.sampler:Sampler.forward" in targets
    from vllm_steer.vllm_adapter.openai_requests import TARGETS

    for module, classes in TARGETS.items():
        for cls in classes:
            assert f"{module}:{cls}.to_sampling_params" in targets


def test_deleted_runner_method_fails_plugin_load_naming_it(monkeypatch, vllm_classes):
    monkeypatch.delattr(vllm_classes.gpu, "_prepare_inputs")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")   # register() would set it otherwise
    installed = []
    monkeypatch.setattr(runner, "install", lambda: installed.append(True))
    with pytest.raises(VLLMDriftError) as ei:
        plugin.register()
    assert_names(ei.value, f"{GPU}._prepare_inputs", "does not exist")
    assert not plugin._registered and not installed   # nothing patched before the checks


def test_deleted_input_processor_method_is_named(monkeypatch, vllm_classes):
    monkeypatch.delattr(vllm_classes.proc, "process_inputs")
    assert_names(drift(), "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
                 "does not exist")


def test_changed_signature_is_named(monkeypatch, vllm_classes):
    def _prepare_inputs(self, scheduler_output):  # num_scheduled_tokens gone
        return None

    monkeypatch.setattr(vllm_classes.gpu, "_prepare_inputs", _prepare_inputs)
    assert_names(drift(), f"{GPU}._prepare_inputs", "changed signature")


def test_every_failure_is_listed(monkeypatch, vllm_classes):
    monkeypatch.delattr(vllm_classes.gpu, "_update_states")
    monkeypatch.delattr(vllm_classes.proc, "process_inputs")
    err = drift()
    assert {s for s, _ in err.failures} >= {
        f"{GPU}._update_states", "vllm.v1.engine.input_processor:InputProcessor.process_inputs"}


def test_cpu_runner_overriding_a_patched_method_is_refused(monkeypatch, vllm_classes):
    monkeypatch.setattr(vllm_classes.cpu, "_update_states", lambda self, so: None,
                        raising=False)
    assert_names(drift(), "vllm.v1.worker.cpu_model_runner:CPUModelRunner._update_states",
                 "overridden by vllm.v1.worker.cpu_model_runner.CPUModelRunner")


def test_instance_attribute_no_longer_assigned_is_named(monkeypatch, vllm_classes):
    def __init__(self, vllm_config, device):  # an __init__ that sets no input_batch
        self.vllm_config = vllm_config

    monkeypatch.setattr(vllm_classes.gpu, "__init__", __init__)
    err = drift()
    assert f"{GPU}.input_batch" in {s for s, _ in err.failures}
    assert "no longer assigned" in str(err)


def test_request_model_dropping_unknown_fields_is_refused(monkeypatch):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    monkeypatch.setattr(ChatCompletionRequest, "model_config",
                        {**ChatCompletionRequest.model_config, "extra": "ignore"})
    assert_names(drift(), "vllm.entrypoints.openai.chat_completion.protocol:"
                 "ChatCompletionRequest", "extra='ignore'")


def test_removed_env_variable_is_named(monkeypatch):
    import vllm.envs as envs

    monkeypatch.delitem(envs.environment_variables, "VLLM_USE_V2_MODEL_RUNNER")
    assert_names(drift(), "vllm.envs:VLLM_USE_V2_MODEL_RUNNER", "no longer an environment")


def test_module_that_moved_is_named():
    from vllm_steer.vllm_adapter.drift import READ, Exists, Symbol

    moved = Symbol("vllm.v1.worker.no_such_runner:Runner.load_model", READ, "test", (Exists(),))
    assert_names(drift([moved]), moved.target, "cannot be imported")


# -- engine-start checks on the live runner ----------------------------------------------------
def live_runner(**batch):
    """An object with the attributes the table says a V1 runner has (the real runner is
    checked by every engine test at load_model)."""
    fields = dict(req_ids=["a"], num_reqs=1, num_computed_tokens_cpu=np.zeros(4, np.int32),
                  token_ids_cpu=np.zeros((4, 8), np.int32))
    fields.update(batch)
    from vllm.v1.sample.sampler import Sampler

    from vllm_steer.vllm_adapter import sampler as sampler_patch

    sampler_patch.install()
    cfg = types.SimpleNamespace(
        hf_text_config=types.SimpleNamespace(num_hidden_layers=2, hidden_size=8),
        dtype=torch.float32)
    return types.SimpleNamespace(
        input_batch=types.SimpleNamespace(**{k: v for k, v in fields.items() if v is not None}),
        max_num_reqs=4, max_num_tokens=64, device=torch.device("cpu"), model_config=cfg,
        sampler=Sampler(), vllm_config=types.SimpleNamespace(
            additional_config={},
            compilation_config=types.SimpleNamespace(traced_files=set())))


def test_runner_instance_checks():
    check_instance("runner", live_runner())
    with pytest.raises(VLLMDriftError) as ei:
        check_instance("runner", live_runner(token_ids_cpu=None))
    assert ei.value.symbol == "vllm.v1.worker.gpu_input_batch:InputBatch.token_ids_cpu"
    assert "no attribute 'token_ids_cpu'" in str(ei.value)
    with pytest.raises(VLLMDriftError, match="has 1 dimensions, expected 2"):
        check_instance("runner", live_runner(token_ids_cpu=np.zeros(8, np.int32)))
    with pytest.raises(VLLMDriftError, match="is a tuple, expected list"):
        check_instance("runner", live_runner(req_ids=("a",)))


def test_runner_class_that_bypasses_the_patch_is_refused():
    class OtherRunner:  # reaches neither patched method
        def _update_states(self, scheduler_output):
            return None

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            return None

    obj = OtherRunner()
    obj.__dict__.update(vars(live_runner()))
    with pytest.raises(VLLMDriftError) as ei:
        runner.check_runner(obj)
    assert ei.value.symbol.endswith("OtherRunner._update_states")


def test_runner_whose_sampler_is_not_patched_is_refused():
    class OwnSampler:
        def forward(self, logits, sampling_metadata):
            return None

    obj = live_runner()
    obj.sampler = OwnSampler()
    with pytest.raises(VLLMDriftError, match="OwnSampler whose forward is not the patched"):
        runner.check_runner(obj)


# -- the sampler's per-row merge (vllm_adapter/sampler.py) -------------------------------------
def _tensors(ids, lps):
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(torch.tensor(ids, dtype=torch.int32),
                           torch.tensor(lps, dtype=torch.float32), torch.tensor([1, 2, 3]))


def test_merge_rows_lays_out_each_row_as_its_request_asked():
    from vllm_steer.vllm_adapter.sampler import merge_rows

    inf = float("-inf")
    topk = _tensors([[5, 5, 6], [7, 8, 7], [9, 9, 1]],
                    [[-.1, -.1, -2.], [-.3, -.2, -.3], [-.4, -.4, -3.]])
    # row 1 asked for ids [11, 12, 13]; vLLM's exact gather pads the other rows with -inf
    exact = _tensors([[5, 0, 0, 0], [7, 11, 12, 13], [9, 0, 0, 0]],
                     [[-.1, inf, inf, inf], [-.3, -5., -6., -7.], [-.4, inf, inf, inf]])
    out = merge_rows(topk, exact, {1: [11, 12, 13]})
    assert out.logprob_token_ids.tolist() == [[5, 5, 6, 0], [7, 11, 12, 13], [9, 9, 1, 0]]
    lp = out.logprobs.tolist()
    assert lp[1] == pytest.approx([-.3, -5., -6., -7.])
    assert lp[0][:3] == pytest.approx([-.1, -.1, -2.]) and lp[0][3] == inf
    assert out.selected_token_ranks.tolist() == [1, 2, 3]
    # a wider top-k than exact ids: exact rows padded past their ids
    wide = _tensors([[5, 1, 2, 3, 4, 6], [7, 1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5]],
                    [[-1.] * 6] * 3)
    out = merge_rows(wide, exact, {1: [11, 12, 13]})
    assert out.logprob_token_ids[1].tolist() == [7, 11, 12, 13, 0, 0]
    assert out.logprobs[1, 4:].tolist() == [inf, inf]


def test_merge_rows_refuses_exact_rows_it_cannot_recognise():
    from vllm_steer.vllm_adapter.sampler import merge_rows

    topk = _tensors([[5, 5], [7, 8], [9, 9]], [[-.1, -.1], [-.3, -.2], [-.4, -.4]])
    exact = _tensors([[5, 0], [7, 12], [9, 0]], [[-.1, -1.], [-.3, -5.], [-.4, -1.]])
    with pytest.raises(VLLMDriftError, match="exact-ID rows"):
        merge_rows(topk, exact, {1: [11]})
    with pytest.raises(VLLMDriftError, match="cannot merge"):
        merge_rows(topk, _tensors([[5, 0]], [[-.1, -1.]]), {0: [0]})


def test_sampler_that_stops_running_the_topk_gather_is_refused(monkeypatch):
    """The wrapper captures the top-k gather forward runs; a forward that no longer calls
    it must fail loudly, not return exact-ID rows for top-k requests."""
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.sampler import Sampler

    from vllm_steer.vllm_adapter import sampler as sampler_patch

    def forward(self, logits, sampling_metadata):   # a drifted forward: no top-k gather
        return SamplerOutput(torch.zeros(3, 1, dtype=torch.int32),
                             _tensors([[5, 0], [7, 11], [9, 0]], [[0., 0.]] * 3))

    monkeypatch.setattr(Sampler, "forward", sampler_patch._wrap_forward(forward))
    meta = types.SimpleNamespace(logprob_token_ids={1: [11]}, max_num_logprobs=2)
    sampler = Sampler()
    with pytest.raises(VLLMDriftError, match="ran the top-k gather 0 times"):
        sampler(torch.zeros(3, 4), meta)
    assert "gather_logprobs" not in vars(sampler)   # the shadow is gone after the call


def test_exact_logprobs_are_refused_under_speculative_decoding():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_steer.vllm_adapter.frontend import check_exact_logprobs

    def processor(spec):
        return types.SimpleNamespace(vllm_config=types.SimpleNamespace(speculative_config=spec))

    req = types.SimpleNamespace(sampling_params=SamplingParams(logprob_token_ids=[1, 2]))
    check_exact_logprobs(processor(None), req)
    with pytest.raises(VLLMValidationError, match="speculative decoding") as ei:
        check_exact_logprobs(processor(object()), req)
    assert ei.value.parameter == "logprob_token_ids"
    plain = types.SimpleNamespace(sampling_params=SamplingParams(logprobs=5))
    check_exact_logprobs(processor(object()), plain)


# -- compile-cache key -------------------------------------------------------------------------
def test_traced_files_follow_the_code_not_a_list_of_names():
    import vllm_steer.steering.layers as layers
    import vllm_steer.steering.slots as slots

    files = set(runner.traced_files())
    assert {layers.__file__, slots.__file__, runner.__file__} <= files
    assert all(os.path.isfile(f) for f in files)   # generated code ("<string>") is skipped
    # ... and so are wrappers made elsewhere that only carry our __module__ (dataclasses)
    assert all(f.startswith(os.path.dirname(os.path.dirname(runner.__file__))) for f in files)
    # front-end code (spec parsing, resolution, the registry) is not part of the key
    assert not {os.path.basename(f) for f in files} & {"resolve.py", "registry.py", "spec.py"}


def test_code_files_follows_calls_into_other_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "tracedpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def delta(x):\n    return x + 1\n")
    (pkg / "unused.py").write_text("def other():\n    return 0\n")
    (pkg / "forwards.py").write_text(
        "from tracedpkg.helpers import delta\nfrom tracedpkg import unused  # noqa\n\n"
        "def forward(x):\n    return [delta(v) for v in x]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tracedpkg.forwards as fwd

    assert runner.code_files([fwd.forward], package="tracedpkg") == sorted(
        [str(pkg / "forwards.py"), str(pkg / "helpers.py")])


def test_compile_key_changes_with_any_traced_file(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 1\n")

    def key() -> str:
        cfg = types.SimpleNamespace(additional_config={},
                                    compilation_config=types.SimpleNamespace(traced_files=set()))
        runner._add_to_compile_key(cfg, [str(a), str(b)])
        assert cfg.compilation_config.traced_files == {str(a), str(b)}
        return cfg.additional_config[runner.COMPILE_KEY]

    k1 = key()
    b.write_text("y = 2\n")
    assert key() != k1


# -- the listing ---------------------------------------------------------------------------------
def test_doctor_lists_and_checks_every_symbol(capsys, monkeypatch, vllm_classes):
    import json

    from vllm_steer.cli import main

    assert main(["doctor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["symbol"] for r in out["symbols"]] == [s.target for s in SYMBOLS]
    assert all(r["status"] == "ok" for r in out["symbols"])
    monkeypatch.delattr(vllm_classes.gpu, "_prepare_inputs")
    assert main(["doctor"]) == 1
    text = capsys.readouterr().out
    assert f"{GPU}._prepare_inputs" in text and "-> FAIL: does not exist" in text


# -- plugin load and the V2 model runner ------------------------------------------------------
def test_register_forces_v1_runner_and_installs_every_patch():
    """In a fresh process (plugin load patches vLLM classes process-wide)."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "os.environ.pop('VLLM_USE_V2_MODEL_RUNNER', None)\n"
        "from vllm_steer import plugin\n"
        "plugin.register()\n"
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as G\n"
        "from vllm.v1.worker.cpu_model_runner import CPUModelRunner as C\n"
        "from vllm.v1.worker.worker_base import WorkerBase as W\n"
        "from vllm.v1.engine.input_processor import InputProcessor as P\n"
        "from vllm.entrypoints.openai.completion.protocol import CompletionRequest as R\n"
        "from vllm.v1.sample.sampler import Sampler as S\n"
        "ours = lambda f: getattr(f, '_vllm_steer', False)\n"
        "print('V2', os.environ['VLLM_USE_V2_MODEL_RUNNER'])\n"
        "print('PATCHED', all(map(ours, [G.load_model, C.load_model, G._update_states,\n"
        "    G._prepare_inputs, G._dummy_run, P.__init__, P.process_inputs,\n"
        "    R.to_sampling_params,\n"
        "    R.to_beam_search_params, S.forward])), hasattr(W, 'vllm_steer_stats'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert "V2 0" in out.stdout and "PATCHED True True" in out.stdout, out.stderr[-3000:]


def test_steering_is_refused_when_the_v2_runner_is_active():
    from vllm.exceptions import VLLMValidationError

    from vllm_steer.vllm_adapter.frontend import steer_request

    processor = types.SimpleNamespace(
        vllm_config=types.SimpleNamespace(use_v2_model_runner=True))
    request = types.SimpleNamespace(
        sampling_params=types.SimpleNamespace(
            extra_args={"steering": {"vectors": [{"name": "happy"}]}}),
        prompt_token_ids=[1, 2], cache_salt=None)
    with pytest.raises(VLLMValidationError, match="V2 model runner") as ei:
        steer_request(processor, request)
    assert ei.value.parameter == "steering"
    unsteered = types.SimpleNamespace(
        sampling_params=types.SimpleNamespace(extra_args={"other_plugin": 1}),
        prompt_token_ids=[1], cache_salt=None)
    steer_request(processor, unsteered)           # only steered requests are refused
    assert unsteered.cache_salt is None


# -- the worker's intake of the wire -----------------------------------------------------------
def bare_steering(num_layers=4, hidden=8):
    """A ``RunnerSteering`` without a runner (its request bookkeeping only)."""
    from vllm_steer.steering.intake import Intake
    from vllm_steer.steering.slots import SlotTable

    st = runner.RunnerSteering.__new__(runner.RunnerSteering)
    st.num_layers, st.hidden, st.reqs = num_layers, hidden, {}
    st.slots = SlotTable(num_layers, 3, hidden, torch.float32, torch.device("cpu"), 1)
    st.intake = Intake(num_layers, hidden, 1)
    return st


def params_with(wire: dict) -> types.SimpleNamespace:
    from vllm_steer.steering.spec import WIRE_KEY

    return types.SimpleNamespace(extra_args={WIRE_KEY: wire})


def test_worker_takes_a_valid_wire_and_refuses_a_malformed_one(tmp_path):
    from tests.test_wire import make
    from vllm_steer.steering.wire import WireError

    st = bare_steering()
    w = make(tmp_path, mode="thinking")
    st.add_request("r1", params_with(w.to_extra_arg()))
    st.add_request("r2", params_with(w.to_extra_arg()))       # same digest: shared slot
    assert st.slots.stats()["live_digests"] == 1 and set(st.reqs) == {"r1", "r2"}
    assert st.reqs["r1"].tracker is not None and st.reqs["r1"].start == w.start
    other = make(tmp_path, ops=(("ablate", 0.5),)).to_extra_arg()
    for bad, field in (({"mode": "sideways"}, "mode"),
                       ({"digest": "0" * 64}, "digest"),   # the recipe does not match its key
                       ({"hidden": 16}, "hidden")):
        with pytest.raises(WireError) as ei:
            st.add_request("bad", params_with({**other, **bad}))
        assert ei.value.field == field
    with pytest.raises(WireError, match="out of range"):
        bare_steering(num_layers=3).add_request("r", params_with(w.to_extra_arg()))
    assert "bad" not in st.reqs and st.slots.stats()["live_digests"] == 1


def test_steered_request_on_an_unhooked_runner_stops_the_engine(tmp_path):
    """A runner class whose load_model was not wrapped has no steering state: a steered
    request must not run unsteered."""
    from tests.test_wire import make

    class Runner:
        pass

    update = runner._wrap_update_states(lambda self, so: "ran")
    wire = make(tmp_path).to_extra_arg()
    new = [types.SimpleNamespace(req_id="r", sampling_params=params_with(wire))]
    so = types.SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=new)
    with pytest.raises(VLLMDriftError, match="was not hooked") as ei:
        update(Runner(), so)
    assert ei.value.symbol.endswith("Runner.load_model")
    plain = types.SimpleNamespace(req_id="p", sampling_params=types.SimpleNamespace(
        extra_args=None))
    assert update(Runner(), types.SimpleNamespace(finished_req_ids=set(),
                                                  scheduled_new_reqs=[plain])) == "ran"
