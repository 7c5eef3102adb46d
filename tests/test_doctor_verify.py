"""``vllm-steer doctor --verify`` for real, as a user on a newer vLLM would meet it.

The processes here see the installed vLLM (0.32) report version 0.33.0 (a
``sitecustomize`` on their ``PYTHONPATH``), so the version policy treats it as newer than
the tested range. Then, in order:

1. plugin load (vLLM's loader, as in every engine process) refuses, naming the command;
2. ``doctor --verify`` (one adapter kind, eager: a partial run, to keep this short; the
   complete plan is the default) loads the plugin in its own engine through the
   run-in-progress marker, steers ``add``/``ablate``/``thinking`` through vLLM, compares
   with the HF reference, and records a passing but partial stamp for vLLM 0.33.0;
3. ``doctor`` still refuses: a partial stamp does not satisfy the policy;
4. the same stamp marked complete (what a full run writes) is accepted by ``doctor``.

(The complete plan on this CPU takes a few minutes: measured in README, not run here.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PRETEND = "0.33.0"


#: Makes ``vllm.__version__`` read PRETEND once vLLM is imported. Importing vLLM at
#: interpreter start instead (a plain ``import vllm`` in sitecustomize) made the first
#: in-process engine generate 10x slower here: keep it lazy.
SHIM = f"""
import importlib.abc
import importlib.machinery
import sys


class _Pretend(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vllm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.__version__ = {PRETEND!r}

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Pretend())
"""


@pytest.fixture()
def env(tmp_path) -> dict[str, str]:
    shim = tmp_path / "pretend"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ)
    env.update(VLLMSTEER_HOME=str(tmp_path / "home"), VLLMSTEER_CACHE=str(tmp_path / "cache"),
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(shim), str(REPO),
                                           env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("VLLMSTEER_SELFCHECK_RUN", None)
    return env


def cli(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_steer.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_doctor_verify_admits_a_newer_vllm_only_after_a_complete_passing_run(
        env, monkeypatch, capsys):
    # 1. plugin load (vLLM's own loader, as every engine process runs it) refuses
    code = "from vllm.plugins import load_general_plugins\nload_general_plugins()\n"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "UnsupportedVLLMError" in p.stderr and "vllm-steer doctor --verify" in p.stderr
    assert f"vLLM {PRETEND} is newer" in p.stderr

    # 2. the self-check runs for real and records a (partial) stamp for 0.33.0
    p = cli(env, "doctor", "--verify", "--json", "--quiet", "--kinds", "residual_pair",
            "--modes", "eager")
    out = json.loads(p.stdout[re.search(r"^\{$", p.stdout, re.M).start():])
    verdict = out["verify"]
    assert verdict["passed"] and not verdict["complete"], p.stderr[-3000:]
    assert verdict["key"]["vllm"] == PRETEND
    (engine,) = verdict["engines"]
    assert engine["adapter"] == "residual_pair" and engine["runs_with"]["compiled"] is False
    cases = {c["name"]: c for c in engine["cases"]}
    assert set(cases) == {"unsteered", "add", "ablate", "thinking", "unsteered (neighbour)"}
    assert all(c["ok"] and c["tokens_compared"] > 0 for c in cases.values())
    assert all(cases[n]["steering_moved"] >= 0.05 for n in ("add", "ablate", "thinking"))
    stamp_file = Path(verdict["stamp"])
    assert stamp_file.parent == Path(env["VLLMSTEER_HOME"]) / "selfcheck"
    assert not list((stamp_file.parent / "running").iterdir())   # the run marker is gone
    # the run itself is not an acceptance: a partial stamp leaves the version refused
    assert p.returncode == 1 and out["version"].startswith("FAIL")

    # 3./4. `doctor` in this process, with vLLM reporting PRETEND and the run's data home
    import vllm

    from vllm_steer.cli import main

    monkeypatch.setattr(vllm, "__version__", PRETEND)
    monkeypatch.setenv("VLLMSTEER_HOME", env["VLLMSTEER_HOME"])
    capsys.readouterr()
    assert main(["doctor"]) == 1                                  # partial: still refused
    assert "vllm-steer doctor --verify" in capsys.readouterr().out
    body = json.loads(stamp_file.read_text())
    body["complete"] = True                                      # what a complete run writes
    stamp_file.write_text(json.dumps(body))
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"vLLM {PRETEND} " in text and "ok (self-check passed)" in text
