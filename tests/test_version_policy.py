"""The version policy (``vllm_steer.compat``), its gate (``vllm_steer.selfcheck.gate``)
and the self-check stamp the gate reads.

A vLLM newer than the tested range is accepted only when the symbol table passes AND a
complete, passing ``doctor --verify`` stamp exists for exactly this vLLM version, torch
version, device and vllm-steer version; otherwise it is refused with the command to run.
Unit tests: no engine (the stamps are written by hand here; ``tests/test_doctor_verify.py``
writes one for real).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from vllm_steer import compat, envvars
from vllm_steer.selfcheck import gate, stamp
from vllm_steer.selfcheck.verify import KINDS, plan
from vllm_steer.vllm_adapter.check import VLLMDriftError

NEWER = "0.33.0"
KEY = stamp.StampKey(vllm=NEWER, torch="2.14.0+cu128", device="cuda:NVIDIA H100 80GB HBM3",
                     plugin="0.1.0")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """An empty data home, and no self-check run in progress."""
    monkeypatch.setenv(envvars.HOME, str(tmp_path / "home"))
    monkeypatch.delenv(envvars.SELFCHECK_RUN, raising=False)
    monkeypatch.delenv(envvars.legacy_name(envvars.SELFCHECK_RUN), raising=False)
    return tmp_path / "home"


def table_ok() -> None:
    return None


def table_fails() -> None:
    raise VLLMDriftError("vllm.v1.sample.sampler:Sampler.forward", "does not exist")


def check(version: str = NEWER, key: stamp.StampKey = KEY, table=table_ok) -> str:
    """The gate on ``version``, with ``table`` as the symbol table's check and ``key`` as
    this installation's stamp key."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gate, "check_all", table)
        mp.setattr(stamp, "current_key", lambda _version=None: key)
        return gate.check_vllm_version(version)


def refused(**kw) -> str:
    with pytest.raises(compat.UnsupportedVLLMError) as ei:
        check(**kw)
    return str(ei.value)


# -- classification -------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.32.0", "0.32.7", "0.32.0+cpu", "0.32.1rc1"])
def test_tested_versions_need_no_stamp(version):
    assert compat.classify(version) == "tested"
    # neither the table hook nor the stamp is consulted for a tested version
    assert check(version, table=table_fails) == version


@pytest.mark.parametrize("version", ["0.33.0", "0.33.0rc1", "0.33.2+cu128", "0.40.0", "1.0.0"])
def test_newer_versions_are_classified_newer(version):
    assert compat.classify(version) == "newer"


# -- stamp absent / present -------------------------------------------------------------------
def test_newer_without_stamp_is_refused_with_the_command_to_run():
    text = refused()
    assert "vllm-steer doctor --verify" in text
    assert NEWER in text and compat.TESTED_RANGE in text
    assert str(KEY) in text                                   # names what the stamp must match


def test_newer_with_a_passing_complete_stamp_is_accepted(home):
    path = stamp.write_stamp(KEY, passed=True, complete=True, details={"seconds": 99})
    assert path.parent == home / "selfcheck"
    assert check() == NEWER
    body = json.loads(path.read_text())
    assert body["key"] == dataclasses.asdict(KEY) and body["seconds"] == 99


@pytest.mark.parametrize("passed,complete", [(False, True), (True, False), (False, False)])
def test_failed_or_partial_stamps_are_not_accepted(passed, complete):
    stamp.write_stamp(KEY, passed=passed, complete=complete)
    assert stamp.read_stamp(KEY)["passed"] is passed          # recorded for doctor to show
    text = refused()
    assert ("failed." if not passed else "was a partial run") in text


@pytest.mark.parametrize("field,value", [("vllm", "0.33.1"), ("torch", "2.14.0+cu126"),
                                         ("device", "cuda:NVIDIA A100-SXM4-80GB"),
                                         ("plugin", "0.2.0")])
def test_a_stamp_for_another_installation_is_not_accepted(field, value):
    other = dataclasses.replace(KEY, **{field: value})
    stamp.write_stamp(other, passed=True, complete=True)
    assert "vllm-steer doctor --verify" in refused()
    assert stamp.find_passed(other) is not None                # it is valid for its own key


def test_a_stamp_file_whose_key_does_not_match_its_name_is_ignored():
    path = stamp.write_stamp(KEY, passed=True, complete=True)
    body = json.loads(path.read_text())
    body["key"]["torch"] = "2.13.0+cpu"                         # e.g. copied between machines
    path.write_text(json.dumps(body))
    refused()


def test_an_unreadable_stamp_is_refused_not_a_crash(caplog):
    path = stamp.stamp_path(KEY)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="vllm_steer"):
        refused()
    assert "unreadable self-check stamp" in caplog.text


# -- the symbol table -------------------------------------------------------------------------
def test_a_failing_symbol_table_refuses_even_with_a_stamp():
    stamp.write_stamp(KEY, passed=True, complete=True)
    with pytest.raises(VLLMDriftError, match="Sampler.forward does not exist"):
        check(table=table_fails)


def test_the_default_table_check_runs_the_real_table(monkeypatch):
    """The gate runs the adapter's ``check_all`` on the installed vLLM."""
    import vllm_steer.vllm_adapter.check as check_mod

    assert gate.check_all is check_mod.check_all
    calls = []
    monkeypatch.setattr(gate, "check_all", lambda: calls.append(1) or table_fails())
    monkeypatch.setattr(stamp, "current_key", lambda _version=None: KEY)
    stamp.write_stamp(KEY, passed=True, complete=True)
    with pytest.raises(VLLMDriftError):
        gate.check_vllm_version(NEWER)
    assert calls == [1]


# -- a self-check in progress -----------------------------------------------------------------
def test_a_run_in_progress_admits_its_own_engines_only(monkeypatch):
    with stamp.verification_run() as run:
        assert stamp.verifying()
        assert check() == NEWER
    assert not stamp.verifying()
    refused()
    monkeypatch.setenv(envvars.SELFCHECK_RUN, run)               # a stale id: token is gone
    refused()
    monkeypatch.setenv(envvars.SELFCHECK_RUN, "../../etc")       # not an id at all
    assert not stamp.verifying()


def test_the_run_marker_reaches_child_processes():
    with stamp.verification_run():
        code = "from vllm_steer.selfcheck import stamp; print(stamp.verifying())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
    assert out.strip() == "True"


# -- defaults: this installation ----------------------------------------------------------
def test_current_key_names_this_installation():
    import torch

    key = stamp.current_key(NEWER)
    assert key.vllm == NEWER and key.torch == torch.__version__
    assert key.device.startswith("cpu:")                       # this machine has no GPU


def test_defaults_end_to_end_refuse_then_accept_after_a_stamp():
    """The real table (installed vLLM) and this machine's key, as plugin load runs it."""
    with pytest.raises(compat.UnsupportedVLLMError, match="doctor --verify"):
        gate.check_vllm_version(NEWER)
    stamp.write_stamp(stamp.current_key(NEWER), passed=True, complete=True)
    assert gate.check_vllm_version(NEWER) == NEWER
    with pytest.raises(compat.UnsupportedVLLMError):
        gate.check_vllm_version("0.33.1")                    # another version: no stamp


def test_doctor_reports_the_policy(capsys):
    from vllm_steer.cli import main

    assert main(["doctor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "ok" and out["verify"] is None
    assert "doctor --verify" in out["policy"]


# -- the plan -------------------------------------------------------------------------------
def test_plan_covers_every_kind_and_marks_partial_runs():
    runs, complete = plan("cpu")
    assert complete and {r.kind for r in runs if r.mode == "eager"} == set(KINDS)
    assert [(r.kind, r.mode) for r in runs if r.mode == "compiled"] == [
        ("residual_pair", "compiled")]
    assert all(r.multiprocess == (r.mode == "compiled") for r in runs)
    cuda, complete = plan("cuda")
    assert complete and {r.kind for r in cuda if r.mode == "compiled"} == set(KINDS)
    assert not plan("cpu", kinds=["stream"])[1]
    assert not plan("cpu", modes=["eager"])[1]
    with pytest.raises(ValueError, match="unknown kind 'residual'"):
        plan("cpu", kinds=["residual"])
