"""The installed wheel is the product: build it from this checkout, install it into a fresh
venv, and run it from a directory outside the checkout, as a user on a GPU box would.

The venv reuses the heavy vLLM / torch install (``--system-site-packages``); the wheel goes
in with ``--no-deps``. The system site-packages may hold an editable install of vllm-steer
pointing at some checkout, so every command runs without ``PYTHONPATH`` and the test
checks that the venv's copy is what Python imports. Runs ``vector info``, ``extract`` (a
tiny recipe on a shipped suffix set), ``demo`` (in full: ~1 min on 2 cores), ``bench
report``, and ``serve`` (started next to a decoy ``vllm_steer/``) with one steered chat
request and one vector upload; writable state must land in ``$VLLMSTEER_HOME``, never in
the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_steer import SteeringVector, envvars

pytestmark = [pytest.mark.slow, pytest.mark.engine]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 420.0

TINY_RECIPE = """\
name: tiny
template: "Act as if you're extremely {persona}."
personas: [[happy, sad]]
suffixes: chat          # the shipped suffix set (package data)
expand_suffixes: false
max_suffixes: 8
layers: [10, 11, 12]
method: mean_diff
"""


class Venv:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.bin = root / "venv" / "bin"
        self.work = root / "work"  # the working directory: outside the checkout
        self.home = Path(env[envvars.HOME])

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.work, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        return r

    def package_files(self) -> list[str]:
        pkg = Path(self.python("import vllm_steer, os; print(os.path.dirname("
                               "vllm_steer.__file__))"))
        return sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*")
                      if "__pycache__" not in p.parts)

    def python(self, code: str) -> str:
        return self.run("python", "-c", code).stdout.strip()


def _log_tail(path: Path, n: int = 6000) -> str:
    """The end of a server log without the pages of triton/nanobind leak reports that a
    dying process prints last (they hid the cause in a CI log)."""
    noise = ("leaked instance", "leaked type", "leaked function", "nanobind:", "- leaked",
             "... skipped remainder", "See https://nanobind")
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if not any(x in ln for x in noise)]
    return "\n".join(lines)[-n:]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, default_model_dir: str) -> Venv:
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build leaves build/ (whose stale files would go into
    # later wheels) and *.egg-info in the checkout.
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "out", "tests",
        "results"))
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(src)], check=True, timeout=300)
    (wheel,) = dist.glob("vllm_steer-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                    str(root / "venv")], check=True, timeout=300)
    # The user's environment without this checkout, our variables or vLLM's: engines that
    # ran earlier in this process leave some behind (VLLM_DIST_IDENT, ...), which a fresh
    # user shell would not have. The model cache is shared (converted once per machine).
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH"
           and not k.startswith((envvars.PREFIX, envvars.LEGACY_PREFIX, "VLLM_"))}
    env.update({envvars.HOME: str(root / "home"),
                envvars.CACHE: str(Path(default_model_dir).parent.parent),
                "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{root / 'venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
    v = Venv(root, env)
    v.work.mkdir()
    subprocess.run([str(v.bin / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=env, timeout=300)
    return v


def test_the_venv_imports_the_wheel_not_the_checkout(venv: Venv) -> None:
    where = venv.python("import vllm_steer, vllm_steer.locations as l; "
                        "print(vllm_steer.__file__); print(l.shipped_configs()); "
                        "print(l.source_checkout())").splitlines()
    site = venv.root / "venv" / "lib"
    assert Path(where[0]).is_relative_to(site), where
    assert Path(where[1]).is_relative_to(site), where
    assert where[2] == "None"
    # every shipped config file made it into the wheel
    shipped = sorted(str(p.relative_to(REPO / "vllm_steer")) for p in
                     (REPO / "vllm_steer" / "configs").rglob("*") if p.is_file())
    assert set(shipped) <= set(venv.package_files())
    # and the playground page's files (served at /steer)
    from vllm_steer.server.playground import FILES
    assert {f"server/static/{name}" for name in FILES} <= set(venv.package_files())


def test_vector_info_and_extract(venv: Venv) -> None:
    happy = venv.python("import vllm_steer.locations as l; "
                        "print(l.shipped_configs() / 'vectors' / 'happy.safetensors')")
    info = json.loads(venv.run("vllm-steer", "vector", "info", happy).stdout)
    assert info["format"] == "safetensors" and info["hidden_size"] == 576
    assert info["metadata"]["created_by"].startswith("vllm-steer ")
    (venv.work / "tiny.yaml").write_text(TINY_RECIPE)
    out = json.loads(venv.run("vllm-steer", "extract", "tiny.yaml", "--out", "tiny.gguf",
                              "-q").stdout)
    assert out["layers"] == [10, 11, 12] and out["pairs"] == 8
    info = json.loads(venv.run("vllm-steer", "vector", "info", "tiny.gguf").stdout)
    assert info["format"] == "gguf" and info["layers"] == [10, 11, 12]


def test_demo_and_bench_report(venv: Venv) -> None:
    before = venv.package_files()
    r = venv.run("vllm-steer", "demo", "--out", "demo", timeout=900)
    assert "(float32)" in r.stdout and "GGUF round trip identical" in r.stdout
    assert "happy sweep" in r.stdout and "Pearson r" in r.stdout
    for name in ("generations.json", "probe.png", "sweep.png", "sweep.json"):
        assert (venv.work / "demo" / name).stat().st_size > 0, name
    assert "Unknown vLLM environment variable" not in r.stderr
    venv.run("vllm-steer", "bench", "report")
    assert "benchmark results" in (venv.work / "bench-results" / "RESULTS.md").read_text()
    assert venv.package_files() == before  # nothing written into the installed package


def test_serve_one_steered_request_and_an_upload(venv: Venv) -> None:
    import httpx
    from openai import OpenAI

    from tests.server_helpers import free_port, make_decoy

    before = venv.package_files()
    # Started from a directory holding a decoy vllm_steer (importing it writes a marker
    # and fails), with the shipped registry named through a symlink and `..`: the server
    # must run the installed code and still know the registry as the package's.
    cwd = venv.root / "serve-cwd"
    marker = make_decoy(cwd)
    shipped = Path(venv.python("import vllm_steer.locations as l; print(l.shipped_registry())"))
    (cwd / "cfg").symlink_to(shipped.parent)
    (cwd / "sub").mkdir()
    port = free_port()
    log_path = venv.root / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(venv.bin / "vllm-steer"), "serve", "--served-model-name", "smollm2",
             "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
             "--gpu-memory-utilization", "0.5", "--max-model-len", "1024",
             "--registry", "sub/../cfg/./registry.yaml"],
            cwd=cwd, env=venv.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, _log_tail(log_path)
            assert time.monotonic() - t0 < START_TIMEOUT_S, _log_tail(log_path)
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        # the playground page, from the installed package's files
        from vllm_steer.server.playground import FILES
        for name in ("", *(f"/{n}" for n in FILES)):
            r = httpx.get(f"{url}/steer{name}", timeout=30)
            assert r.status_code == 200 and r.content, (name, r.status_code)
        assert "vllm-steer" in httpx.get(f"{url}/steer", timeout=30).text
        listed = httpx.get(f"{url}/v1/steering/vectors", timeout=30).json()
        assert {"happy", "cautious_thinking"} <= {v["id"] for v in listed["data"]}
        client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY")

        def chat(steering: dict | None) -> str:
            r = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "How was your day?"}],
                max_tokens=24, temperature=0,
                extra_body={"steering": steering} if steering else None)
            return r.choices[0].message.content

        plain = chat(None)
        steered = chat({"vectors": [{"name": "happy", "scale": -8.0}], "apply_to": "generated"})
        assert steered != plain
        # an upload lands in the data home, not in the installed package
        g = torch.Generator().manual_seed(0)
        SteeringVector({i: torch.randn(576, generator=g) for i in (10, 11)}).save(
            venv.root / "mine.gguf")
        r = httpx.post(f"{url}/v1/steering/vectors", params={"name": "mine"},
                       content=(venv.root / "mine.gguf").read_bytes(),
                       headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 201, r.text
        assert chat({"vectors": [{"name": "mine", "scale": 4.0}]}) != plain
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert "Unknown vLLM environment variable" not in log, log[-3000:]
    uploads = venv.home / "uploads"
    assert (uploads / "registry.overlay.yaml").is_file()
    assert [p.name for p in uploads.glob("mine-*.gguf")]
    assert venv.package_files() == before
    assert not marker.exists(), "a server process imported the working directory's code"
