"""Where vllm-steer reads and writes: shipped package data, the registry a command uses,
the data home for writable state, the registry's own path form in specs, and the
environment variables (which vLLM must not take for its own)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import vllm_steer
from vllm_steer import SteeringVector, envvars, locations
from vllm_steer.steering.registry import OVERLAY_NAME, Registry

PACKAGE = Path(vllm_steer.__file__).resolve().parent


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data home; no registry or upload variables from the caller's shell."""
    for name in (envvars.HOME, envvars.REGISTRY, envvars.UPLOAD_DIR, envvars.MAX_UPLOAD_BYTES):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(envvars.legacy_name(name), raising=False)
    h = tmp_path / "home"
    monkeypatch.setenv(envvars.HOME, str(h))
    return h


# -- shipped data ------------------------------------------------------------------------
def test_shipped_configs_are_package_data():
    cfg = locations.shipped_configs()
    assert cfg == PACKAGE / "configs"
    for rel in ("registry.yaml", "vectors/happy.safetensors", "vectors/happy.yaml",
                "vectors/cautious_thinking.safetensors", "questions/mood_yes_no.yaml",
                "experiments/probe_reasoning.yaml"):
        assert (cfg / rel).is_file(), rel


def test_repository_configs_is_the_package_data_not_a_copy():
    root = locations.source_checkout()
    if root is None:
        pytest.skip("not a source checkout")
    assert (root / "configs").is_symlink()
    assert (root / "configs").resolve() == locations.shipped_configs()


def test_shipped_registry_lists_existing_vectors(home):
    reg = Registry.from_yaml(locations.shipped_registry())
    assert {"happy", "cautious_thinking"} <= set(reg.entries)
    for e in reg.entries.values():
        assert e.path.is_file() and locations.shipped_configs() in e.path.parents


def test_registry_path_choice(tmp_path, home):
    assert locations.registry_path() == locations.shipped_registry()
    assert locations.registry_path(None, {envvars.REGISTRY: str(tmp_path / "e.yaml")}) == \
        tmp_path / "e.yaml"
    assert locations.registry_path(tmp_path / "x.yaml",
                                   {envvars.REGISTRY: "/elsewhere.yaml"}) == tmp_path / "x.yaml"


def test_readme_config_paths_name_the_shipped_files_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = locations.shipped_configs()
    assert locations.find_config("configs/vectors/happy.yaml") == shipped / "vectors/happy.yaml"
    assert locations.find_config("configs/experiments/probe_reasoning.yaml") == \
        shipped / "experiments/probe_reasoning.yaml"
    # a file of that name here wins; other paths are left alone (and fail where used)
    (tmp_path / "configs" / "vectors").mkdir(parents=True)
    (tmp_path / "configs" / "vectors" / "happy.yaml").write_text("name: mine\n")
    assert locations.find_config("configs/vectors/happy.yaml") == \
        Path("configs/vectors/happy.yaml")
    assert locations.find_config("configs/nope.yaml") == Path("configs/nope.yaml")
    assert locations.find_config("other/happy.yaml") == Path("other/happy.yaml")


def test_installed_package_is_read_only_by_policy(monkeypatch):
    happy = locations.shipped_configs() / "vectors" / "happy.safetensors"
    monkeypatch.setattr(locations, "source_checkout", lambda: None)  # as from a wheel
    assert locations.in_installed_package(happy)
    assert not locations.in_installed_package(Path.cwd() / "happy.safetensors")
    monkeypatch.setattr(locations, "source_checkout", lambda: PACKAGE.parent)
    assert not locations.in_installed_package(happy)  # a checkout trains into configs/


# -- writable state ----------------------------------------------------------------------
def test_shipped_registry_uploads_go_to_the_data_home(home):
    reg = Registry.from_yaml(locations.shipped_registry())
    assert reg.upload_dir == home / "uploads"
    assert PACKAGE not in reg.upload_dir.parents


def test_shipped_registry_in_an_installed_layout_never_writes_into_the_package(
        tmp_path, monkeypatch, home):
    """A copy of the package outside any checkout (as a wheel installs it): registering
    and removing vectors through its shipped registry leaves the package unchanged."""
    site = tmp_path / "site-packages"
    shutil.copytree(PACKAGE, site / "vllm_steer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pkg_cfg = (site / "vllm_steer" / "configs").resolve()
    before = sorted(p.relative_to(pkg_cfg) for p in pkg_cfg.rglob("*"))
    monkeypatch.setattr(locations, "shipped_configs", lambda: pkg_cfg)
    reg = Registry.from_yaml(pkg_cfg / "registry.yaml")
    up = reg.ensure_upload_dir() / "mine.safetensors"
    SteeringVector({3: torch.ones(576)}).save(up)
    reg.register("mine", up)
    reg.unregister("happy")
    assert sorted(p.relative_to(pkg_cfg) for p in pkg_cfg.rglob("*")) == before
    assert (home / "uploads" / OVERLAY_NAME).is_file()
    again = Registry.from_yaml(pkg_cfg / "registry.yaml")
    assert "mine" in again.entries and "happy" not in again.entries


def test_a_registry_inside_any_package_copy_uploads_to_the_data_home_however_spelled(
        tmp_path, monkeypatch, home):
    """The code that reads a registry may not be the package the registry lies in (another
    version's API process read the installed registry): every ``vllm_steer`` package
    directory counts, and every spelling of the path (symlinks, ``..``, relative)."""
    other = tmp_path / "site-packages" / "vllm_steer"           # not the running package
    (other / "configs").mkdir(parents=True)
    (other / "__init__.py").write_text("")
    reg = other / "configs" / "registry.yaml"
    reg.write_text("vectors: {}\n")
    (tmp_path / "link.yaml").symlink_to(reg)
    (tmp_path / "cfgdir").symlink_to(other / "configs")
    (tmp_path / "work" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "deeper")
    spellings = [reg, tmp_path / "link.yaml", tmp_path / "cfgdir" / "registry.yaml",
                 other / "configs" / ".." / "configs" / "registry.yaml",
                 Path("../../site-packages/vllm_steer/configs/registry.yaml"),
                 Path("../../cfgdir/./registry.yaml"), Path("../../link.yaml")]
    for spelled in spellings:
        assert Registry.from_yaml(spelled).upload_dir == home / "uploads", spelled
        assert locations.in_a_package(spelled), spelled
    # the running package's own registry through a symlink, too
    (tmp_path / "shipped.yaml").symlink_to(locations.shipped_registry())
    assert Registry.from_yaml(tmp_path / "shipped.yaml").upload_dir == home / "uploads"
    # a directory called vllm_steer that is not a package is just a directory
    plain = tmp_path / "data" / "vllm_steer"
    plain.mkdir(parents=True)
    (plain / "reg.yaml").write_text("vectors: {}\n")
    assert Registry.from_yaml(plain / "reg.yaml").upload_dir == plain / "uploads"
    assert not locations.in_a_package(plain / "reg.yaml")


def test_other_registries_keep_uploads_next_to_them_unless_overridden(tmp_path, monkeypatch,
                                                                      home):
    path = tmp_path / "reg.yaml"
    path.write_text("vectors: {}\n")
    assert Registry.from_yaml(path).upload_dir == tmp_path / "uploads"
    path.write_text("upload_dir: store\nvectors: {}\n")
    assert Registry.from_yaml(path).upload_dir == tmp_path / "store"
    monkeypatch.setenv(envvars.UPLOAD_DIR, str(tmp_path / "env"))
    assert Registry.from_yaml(path).upload_dir == tmp_path / "env"
    assert Registry.from_yaml(locations.shipped_registry()).upload_dir == tmp_path / "env"


def test_data_home_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv(envvars.HOME, raising=False)
    monkeypatch.delenv(envvars.legacy_name(envvars.HOME), raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert locations.data_home() == tmp_path / "xdg" / "vllm-steer"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    assert locations.data_home() == tmp_path / "u" / ".local" / "share" / "vllm-steer"
    monkeypatch.setenv(envvars.HOME, str(tmp_path / "h"))
    assert locations.data_home() == tmp_path / "h"


# -- the registry's own path form in specs -------------------------------------------------
def test_specs_accept_the_registry_files_path_form(tmp_path):
    vdir = tmp_path / "vectors"
    vdir.mkdir()
    SteeringVector({1: torch.ones(4)}).save(vdir / "v.safetensors")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    path = tmp_path / "reg.yaml"
    path.write_text("allowed_dirs: [vectors]\nvectors:\n  v: {path: vectors/v.safetensors}\n")
    reg = Registry.from_yaml(path)
    want = (vdir / "v.safetensors").resolve()
    assert reg.is_allowed("v.safetensors") == want          # relative to the allowed dir
    assert reg.is_allowed("vectors/v.safetensors") == want  # as the registry file writes it
    assert reg.is_allowed(reg.entries["v"].path) == want    # absolute
    # the registry-relative form still has to land inside an allowed dir: this names the
    # (missing) vectors/secret.safetensors, never the file next to the registry
    assert reg.is_allowed("secret.safetensors") == vdir.resolve() / "secret.safetensors"
    assert reg.is_allowed("vectors/../secret.safetensors") == vdir.resolve() / "secret.safetensors"
    assert reg.is_allowed("../secret.safetensors") is None
    assert reg.is_allowed(tmp_path / "secret.safetensors") is None
    assert reg.is_allowed("reg.yaml") == vdir.resolve() / "reg.yaml"  # missing: reported so


# -- environment variables -----------------------------------------------------------------
def test_no_variable_of_ours_is_named_like_a_vllm_one():
    names = [v for k, v in vars(envvars).items() if k.isupper() and isinstance(v, str)
             and v.startswith(envvars.PREFIX)]
    assert len(names) >= 7
    assert not [n for n in names if n.startswith("VLLM_")]


def test_legacy_names_still_work_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv(envvars.UPLOAD_DIR, raising=False)
    monkeypatch.setenv("VLLM_STEER_UPLOAD_DIR", "/old")
    envvars._warned.discard("VLLM_STEER_UPLOAD_DIR")
    with caplog.at_level(logging.WARNING, logger="vllm_steer"):
        assert envvars.get(envvars.UPLOAD_DIR) == "/old"
    assert "VLLM_STEER_UPLOAD_DIR is deprecated, use VLLMSTEER_UPLOAD_DIR" in caplog.text
    monkeypatch.setenv(envvars.UPLOAD_DIR, "/new")
    assert envvars.get(envvars.UPLOAD_DIR) == "/new"


def test_steered_environments_pass_vllms_strict_variable_check(tmp_path, monkeypatch):
    """vLLM refuses unknown VLLM_* variables with --fail-on-environ-validation (and warns
    at every engine start otherwise); what `serve` and `make_llm` set must pass."""
    from vllm.platforms import current_platform

    from vllm_steer.llm_factory import steering_environ
    from vllm_steer.server.serve_command import serve_env

    # any VLLM_* the test process holds is dropped too: vLLM itself sets some it does not
    # list (VLLM_DIST_IDENT, after an engine ran in this process); only ours are checked
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith((envvars.PREFIX, envvars.LEGACY_PREFIX, "VLLM_"))}
    for env in (serve_env(None, clean), serve_env(str(tmp_path / "r.yaml"), clean)):
        monkeypatch.setattr(os, "environ", env)
        current_platform.validate_environ(hard_fail=True)
    monkeypatch.setattr(os, "environ", dict(clean))
    steering_environ(tmp_path / "r.yaml")
    assert os.environ[envvars.REGISTRY] == str(tmp_path / "r.yaml")
    current_platform.validate_environ(hard_fail=True)


def test_a_spec_may_name_a_vector_as_the_shipped_registry_does(home):
    """`{"path": "vectors/happy.safetensors"}` (the registry file's own form) composes the
    same delta as the name `happy` and as `happy.safetensors` (allowed-dir form)."""
    from vllm_steer.steering.resolve import Resolver
    from vllm_steer.steering.spec import parse_spec

    res = Resolver(Registry.from_yaml(locations.shipped_registry()), num_layers=30,
                   hidden_size=576, store_root=home / "store")
    by_name = res.program(parse_spec({"vectors": [{"name": "happy", "scale": 2.0}]}))
    for path in ("vectors/happy.safetensors", "happy.safetensors"):
        c = res.program(parse_spec({"vectors": [{"path": path, "scale": 2.0}]}))
        assert c.digest == by_name.digest, path


def test_serving_docs_describe_the_shipped_registry(home):
    root = locations.source_checkout()
    if root is None:
        pytest.skip("not a source checkout")
    text = (root / "docs" / "serving.md").read_text()
    section = text.split("## Register a vector")[1].split("\n## ")[0]
    assert "starts empty" not in section
    for name in Registry.from_yaml(locations.shipped_registry()).entries:
        assert f"`{name}`" in section, name
