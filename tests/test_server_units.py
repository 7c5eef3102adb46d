"""Server pieces without a server: registry registration/persistence, body merging, CLI."""

from __future__ import annotations

import threading

import pytest

from tests.steer_helpers import upload_tiny
from vllm_steer.steering.registry import OVERLAY_NAME, Registry, RegistryError
from vllm_steer.steering.spec import SpecError


def test_registrations_persist_across_reloads(reg_file):
    reg = Registry.from_yaml(reg_file)
    assert reg.persistent and reg.upload_dir == reg_file.parent / "uploads"
    up = upload_tiny(reg, "u")
    reg.register("u", up, scale=0.5, layers=(0,))
    reg.register("p", reg_file.parent / "vectors" / "a.safetensors")
    reg.unregister("b")  # a base-file entry: remembered as removed
    again = Registry.from_yaml(reg_file)
    assert set(again.entries) == {"a", "u", "p"}
    assert again.entries["u"].scale == 0.5 and again.entries["u"].layers == (0,)
    assert again.entries["u"].path == up and again.entries["u"].origin == "registered"
    # re-registering a removed base name brings it back (from the overlay)
    again.register("b", up, replace=False)
    assert Registry.from_yaml(reg_file).entries["b"].path == up


def test_replace_and_delete_remove_only_unused_uploads(reg_file):
    reg = Registry.from_yaml(reg_file)
    reg.retire_after_s = 0  # no grace period (tests/test_registry_shared.py tests it)
    first, second = upload_tiny(reg, "one"), upload_tiny(reg, "two")
    reg.register("x", first)
    reg.register("y", first)
    with pytest.raises(KeyError):
        reg.register("x", second)
    reg.register("x", second, replace=True)
    assert first.exists()  # still used by "y"
    reg.unregister("y")
    assert not first.exists()
    reg.unregister("x")
    assert not second.exists()
    with pytest.raises(KeyError):
        reg.unregister("x")
    # files of the base registry are never deleted
    reg.unregister("a")
    assert (reg_file.parent / "vectors" / "a.safetensors").exists()


@pytest.mark.parametrize("name", ["", "a,b", "../x", "a b", "x" * 200, "-x", "\u00e9"])
def test_bad_names_are_refused(reg_file, name):
    reg = Registry.from_yaml(reg_file)
    with pytest.raises(ValueError, match="invalid vector name"):
        reg.register(name, reg_file.parent / "vectors" / "a.safetensors")


def test_concurrent_registration_is_consistent(reg_file):
    reg = Registry.from_yaml(reg_file)
    path = reg_file.parent / "vectors" / "a.safetensors"

    def work(i: int) -> None:
        for j in range(20):
            reg.register(f"t{i}_{j}", path)
            if j % 2:
                reg.unregister(f"t{i}_{j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    expected = {f"t{i}_{j}" for i in range(8) for j in range(0, 20, 2)} | {"a", "b"}
    assert set(reg.entries) == expected
    assert set(Registry.from_yaml(reg_file).entries) == expected


def test_overlay_and_limits_are_validated(reg_file, monkeypatch):
    reg = Registry.from_yaml(reg_file)
    assert reg.max_upload_bytes == 64 << 20
    reg.ensure_upload_dir()
    (reg.upload_dir / OVERLAY_NAME).write_text("vectors: [1, 2]\n")
    with pytest.raises(RegistryError, match="mapping"):
        Registry.from_yaml(reg_file)
    (reg.upload_dir / OVERLAY_NAME).unlink()
    monkeypatch.setenv("VLLMSTEER_MAX_UPLOAD_BYTES", "1234")
    assert Registry.from_yaml(reg_file).max_upload_bytes == 1234
    monkeypatch.setenv("VLLMSTEER_MAX_UPLOAD_BYTES", "-1")
    with pytest.raises(RegistryError, match="positive"):
        Registry.from_yaml(reg_file)


def test_registry_without_file_uses_a_temporary_upload_dir():
    reg = Registry()
    assert not reg.persistent and reg.overlay_path is None
    d = reg.ensure_upload_dir()
    assert d.is_dir() and "vllm-steer-uploads-" in d.name


def test_is_allowed_refuses_unencodable_paths(reg_file):
    reg = Registry.from_yaml(reg_file)
    for p in ("\ud800", "a\x00b", "~nouser-vllm-steer/x", "../reg.yaml", "/etc/passwd"):
        assert reg.is_allowed(p) is None, p
    assert reg.is_allowed("a.safetensors") == reg_file.parent / "vectors" / "a.safetensors"


# -- request body --------------------------------------------------------------------------
class _Req:
    def __init__(self, extra=None, xargs=None):
        self.model_extra = extra or {}
        self.vllm_xargs = xargs


def test_body_steering_lands_in_extra_args():
    from vllm_steer.server.body import merged_extra_args

    spec = {"vectors": [{"name": "a"}]}
    assert merged_extra_args(_Req({"steering": spec}), None) == {"steering": spec}
    assert merged_extra_args(_Req({"steering": spec}), {"k": 1}) == {"k": 1, "steering": spec}
    assert merged_extra_args(_Req({"steering": None}), {"k": 1}) == {"k": 1}
    assert merged_extra_args(_Req({"other": 1}), None) is None
    with pytest.raises(SpecError) as ei:
        merged_extra_args(_Req({"steering": spec}), {"steer": "a"})
    assert ei.value.field == "steering"
    with pytest.raises(SpecError) as ei:
        merged_extra_args(_Req({"steer_scale": 2}), None)
    assert ei.value.field == "steer_scale"


def test_request_models_are_patched_by_the_adapter():
    import subprocess
    import sys

    code = ("from vllm_steer.server import requests; requests.install()\n"
            "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest"
            " as C\n"
            "r = C(model='m', messages=[{'role': 'user', 'content': 'hi'}],"
            " steering={'vectors': [{'name': 'a'}]})\n"
            "print(r.to_sampling_params(4, {}).extra_args)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert "{'steering': {'vectors': [{'name': 'a'}]}}" in out.stdout, out.stderr[-2000:]


# -- CLI ---------------------------------------------------------------------------------
def test_serve_env_enables_both_plugins_and_a_registry(tmp_path):
    from vllm_steer.locations import shipped_registry
    from vllm_steer.server.serve_command import serve_env

    env = serve_env(None, {"VLLM_PLUGINS": "other"})
    assert env["VLLM_PLUGINS"] == "other,vllm_steer,vllm_steer_routes,vllm_steer_metrics"
    assert env["VLLMSTEER_REGISTRY"] == str(shipped_registry())  # never an empty registry
    env = serve_env(str(tmp_path / "r.yaml"), {"VLLMSTEER_REGISTRY": "/elsewhere.yaml"})
    assert env["VLLMSTEER_REGISTRY"] == str(tmp_path / "r.yaml")
    assert serve_env(None, {"VLLMSTEER_REGISTRY": "/x.yaml"})["VLLMSTEER_REGISTRY"] == \
        "/x.yaml"
    # the deprecated spelling is still honoured
    assert serve_env(None, {"VLLM_STEER_REGISTRY": "/y.yaml"})["VLLMSTEER_REGISTRY"] == \
        "/y.yaml"


def test_serve_runs_vllm_in_safe_path_mode_keeping_a_deliberate_pythonpath(
        tmp_path, monkeypatch):
    """``python -m`` would put the working directory first on ``sys.path``: a directory
    holding another ``vllm_steer`` would then be what the server runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.server_helpers import make_decoy
    from vllm_steer.server import serve_command as cli

    argv = cli.vllm_cli_argv()
    assert argv[:4] == [sys.executable, "-P", "-m", "vllm_steer.server.vllm_cli"]
    ours = Path(cli.__file__).resolve().parent.parent.parent
    work = tmp_path / "work"
    marker = make_decoy(work)
    env = cli.serve_env(None, {**os.environ, "PYTHONPATH": str(ours)})
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONPATH"] == str(ours)
    # what the served process and every process vLLM starts (-m, -c, scripts) import
    for head in (argv[:2], [sys.executable]):
        for how in (["-c", "import vllm_steer; print(vllm_steer.__file__)"],
                    ["-m", "vllm_steer.envvars"]):
            r = subprocess.run([*head, *how], cwd=work, env=env, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0 and not marker.exists(), (head, how, r.stderr[-2000:])
    r = subprocess.run([*argv[:2], "-c", "import vllm_steer; print(vllm_steer.__file__)"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert Path(r.stdout.strip()).resolve() == ours / "vllm_steer" / "__init__.py"
    # without safe-path mode the decoy would have been imported (the test can fail)
    r = subprocess.run([sys.executable, "-c", "import vllm_steer"], cwd=work,
                       env={**env, "PYTHONSAFEPATH": ""}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and marker.exists()
    # a checkout run as `python -m vllm_steer.cli` (found only through the working
    # directory) passes its own directory on explicitly
    monkeypatch.setattr(cli, "_implicit_path_entry", lambda: ours)
    env = cli.serve_env(None, {"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(ours), "/elsewhere"])
    monkeypatch.setattr(cli, "_implicit_path_entry", lambda: None)
    assert "PYTHONPATH" not in cli.serve_env(None, {})


def test_serve_passes_unknown_args_to_vllm(capsys, default_model_dir):
    from vllm_steer.cli import main

    assert main(["serve", "--print-command", "--port", "8001", "--max-model-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "PYTHONSAFEPATH=1 VLLM_PLUGINS=vllm_steer,vllm_steer_routes,vllm_steer_metrics" in out
    assert " -P -m vllm_steer.server.vllm_cli serve " in out
    # the checkpoint's own dtype (vLLM's `auto` would run the fp32 model in bf16) ...
    assert f"vllm_steer.server.vllm_cli serve {default_model_dir} --dtype float32 " \
           "--port 8001 --max-model-len 2048" in out
    # ... unless the user names one
    assert main(["serve", "--print-command", "--dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"serve {default_model_dir} --dtype=bfloat16"), out
    with pytest.raises(SystemExit):
        main(["vector", "info", "x.safetensors", "--port", "1"])


def test_a_bug_in_a_route_is_a_500_not_the_clients_fault():
    """vLLM's app answers TypeError/ValueError with 400; the plugin's routes answer an
    unexpected exception with 500 (OpenAI's error shape), their own errors unchanged."""
    from fastapi import APIRouter, FastAPI
    from fastapi.testclient import TestClient

    from vllm_steer.server.common import SteerHTTPError, SteerRoute, handle_steer_error
    from vllm_steer.server.routes import build_router

    router = APIRouter(route_class=SteerRoute)

    @router.get("/bug")
    async def bug():
        raise TypeError("f() missing 1 required positional argument")

    @router.get("/refused")
    async def refused():
        raise SteerHTTPError(400, "bad", "field")

    app = FastAPI()
    app.include_router(router)
    app.add_exception_handler(SteerHTTPError, handle_steer_error)

    async def vllm_like(_request, exc):   # what vLLM's app does with these
        from fastapi.responses import JSONResponse
        return JSONResponse({"error": {"message": str(exc), "code": 400}}, status_code=400)

    app.add_exception_handler(TypeError, vllm_like)
    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/bug")
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "InternalServerError" and "TypeError" in err["message"]
    r = client.get("/refused")
    assert r.status_code == 400 and r.json()["error"]["param"] == "field"
    # every route the plugin mounts is such a route
    assert all(isinstance(rt, SteerRoute) for rt in build_router().routes)
