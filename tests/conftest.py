"""Shared fixtures. Environment defaults are set at import, before vLLM is imported."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU backend
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that finish a parallel region sleep instead of spinning (read when torch
# loads its OpenMP runtime, so before torch is imported; engine and server processes
# inherit it). With other processes on the 2 cores, spinning threads made HF forwards 3x
# slower and use 3x the CPU time (2 threads: 41-44 s against 14-15 s PASSIVE, and 13-14 s
# on one thread; load 11-20); the thread count and so the numbers computed are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Writable state (uploads, the vector store) of this test session, never the user's home.
os.environ.setdefault("VLLMSTEER_HOME", __import__("tempfile").mkdtemp(prefix="vllmsteer-home-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: The modules whose engine tests share one default-model engine (``default_engine``).
#: They run one after another (``pytest_collection_modifyitems``) and the engine stops
#: after the last test that uses it, so no idle engine waits through the other modules.
from tests import xdist_units  # noqa: E402
from tests.xdist_units import SHARED_ENGINE_FIXTURE, SHARED_ENGINE_MODULES  # noqa: E402


def pytest_configure(config):
    # two workers under ``make test``: groups, order and caches (tests/xdist_units.py)
    if not config.pluginmanager.is_registered(xdist_units):
        config.pluginmanager.register(xdist_units, "vllm_steer_xdist_units")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The converted fp32 SmolLM2-135M-Instruct directory (converted once, then cached)."""
    from vllm_steer.default_model import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture()
def reg_file(tmp_path):
    """A registry file naming two tiny vectors (hidden 4): ``a`` (layer 1) and ``b``
    (scale 2), with ``vectors/`` as its allowed directory. No engine."""
    import torch

    from vllm_steer import SteeringVector

    vdir = tmp_path / "vectors"
    vdir.mkdir()
    for name in ("a", "b"):
        SteeringVector({1: torch.ones(4)}).save(str(vdir / f"{name}.safetensors"))
    path = tmp_path / "reg.yaml"
    path.write_text("allowed_dirs: [vectors]\nvectors:\n  a: vectors/a.safetensors\n"
                    "  b: {path: vectors/b.safetensors, scale: 2.0}\n")
    return path


class _SharedEngine:
    """The session's default-model engine: started by the first test that asks for it,
    stopped after the last one (``pytest_runtest_teardown``) or at the session's end."""

    def __init__(self) -> None:
        self.value: tuple | None = None
        self.last_user: str | None = None  # nodeid of the last collected test using it

    def start(self, model_dir: str, root: Path) -> tuple:
        """The running engine; ``root`` (a fresh directory) takes the registry of a new
        one."""
        if self.value is None:
            from tests.steer_helpers import env_registry
            from vllm_steer.fixtures.engines import make_test_llm
            from vllm_steer.fixtures.vectors import write_test_vectors

            reg = write_test_vectors(root)
            shipped = Path(__file__).resolve().parent.parent / "configs" / "vectors"
            with reg.open("a") as f:  # the shipped, trained happy vector (probe sweeps)
                f.write(f"  happy: {{path: {shipped / 'happy.safetensors'}}}\n")
            env_registry(reg)
            # its own engine-core process (vLLM's default): the slot tests read the
            # workers' counters after the engine freed finished requests, which an
            # in-process core does only at its next step; and the HF references computed
            # here keep this process's torch threads
            self.value = (make_test_llm(model_dir), reg)
        return self.value

    def stop(self) -> None:
        if self.value is not None:
            from vllm_steer.fixtures.engines import shutdown

            llm, _ = self.value
            self.value = None
            shutdown(llm)


_SHARED = _SharedEngine()


@pytest.fixture(scope="module")
def default_engine(default_model_dir, tmp_path_factory):
    """``(llm, registry)``: one eager default-model engine with ``TEST_ENGINE_OPTIONS``
    (block size 32, a 256-token step budget: long prompts are prefilled in chunks) for
    the modules in ``SHARED_ENGINE_MODULES``, started once (again only if a test asks for
    it after it was stopped). The registry holds the test vectors (``write_test_vectors``)
    plus the shipped ``happy``. The prefix cache and the workers' counters carry over
    between those modules: a test that needs an empty prefix cache resets it, and slot
    counts are checked against what the test's own requests leave (none), not against a
    fresh engine."""
    pytest.importorskip("vllm")
    return _SHARED.start(default_model_dir, tmp_path_factory.mktemp("default-engine"))


def pytest_sessionfinish(session, exitstatus):
    _SHARED.stop()


def _module_name(item: pytest.Item) -> str:
    return Path(str(item.fspath)).name


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The shared-engine modules' tests one after another, from where the first of them
    would run (file order otherwise kept); remember the last test using the engine."""
    first = next((i for i, it in enumerate(items)
                  if _module_name(it) in SHARED_ENGINE_MODULES), None)
    if first is not None:
        shared = [it for it in items if _module_name(it) in SHARED_ENGINE_MODULES]
        rest = [it for it in items if _module_name(it) not in SHARED_ENGINE_MODULES]
        items[:] = rest[:first] + shared + rest[first:]
    users = [it for it in items if SHARED_ENGINE_FIXTURE in getattr(it, "fixturenames", ())]
    _SHARED.last_user = users[-1].nodeid if users else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the shared engine right after the last test that uses it (and its module's
    fixtures) was torn down."""
    try:
        return (yield)
    finally:
        if item.nodeid == _SHARED.last_user:
            _SHARED.stop()
