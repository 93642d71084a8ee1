"""banditrouter.ray_local's HAProxy parts: `server.proxy` is validated, and the worker hook makes Ray's HAProxy
config bind its stats and Prometheus listeners where the HTTP frontend binds (rendered here with Ray's own
template and config class; tests/integration/test_haproxy.py checks the sockets of a running app)."""

from __future__ import annotations

import os
import re

import pytest

from banditrouter.config import ConfigError, load_config


def _render(host: str) -> str:
    from jinja2 import ChainableUndefined, Environment
    from ray.serve._private import haproxy, haproxy_templates
    from ray.serve.config import HTTPOptions

    env = Environment(undefined=ChainableUndefined)  # only the binds matter here
    env.filters["haproxy_fmt"] = haproxy._haproxy_fmt_literal  # as Ray's HAProxy manager renders it
    config = haproxy.HAProxyConfig(http_options=HTTPOptions(host=host, port=8000))
    return env.from_string(haproxy_templates.HAPROXY_CONFIG_TEMPLATE).render(config=config, backends=[])


def _binds(text: str) -> list[str]:
    return re.findall(r"^\s*bind (\S+)", text, flags=re.M)


def test_haproxy_listeners_bind_the_frontend_host(monkeypatch):
    from ray.serve._private import haproxy, haproxy_templates

    from banditrouter.ray_local import bind_haproxy_listeners_to_frontend_host

    # Ray's own template binds stats and Prometheus on every interface; both references restored after the test
    monkeypatch.setattr(haproxy_templates, "HAPROXY_CONFIG_TEMPLATE", haproxy_templates.HAPROXY_CONFIG_TEMPLATE)
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)
    before = _binds(_render("127.0.0.1"))
    assert any(b.startswith(("*:", ":")) for b in before), before
    bind_haproxy_listeners_to_frontend_host()
    after = _binds(_render("127.0.0.1"))
    assert len(after) == len(before) and all(b.startswith("127.0.0.1:") for b in after), after
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == haproxy_templates.HAPROXY_CONFIG_TEMPLATE  # the reference it renders
    assert all(b.startswith("*:") for b in _binds(_render("0.0.0.0")))  # a host of 0.0.0.0 still means every one


def test_proxy_is_validated():
    from banditrouter.ray_local import init_local_ray

    with pytest.raises(ValueError, match="proxy must be"):
        init_local_ray(proxy="nginx")
    models = [{"name": "a"}, {"name": "b"}]
    with pytest.raises(ConfigError, match="server.proxy"):
        load_config({"server": {"proxy": "nginx"}, "models": models})
    assert load_config({"server": {"proxy": "haproxy"}, "models": models}).server.proxy == "haproxy"
    assert load_config({"models": models}).server.proxy == "serve"


def test_build_app_warns_when_haproxy_is_asked_for_but_not_in_the_environment(monkeypatch, caplog):
    from deployments.app import build_app

    models = [{"name": m, "replay": {"split": "test"}} for m in ("a", "b")]
    cfg = load_config({"server": {"proxy": "haproxy"}, "policy": {"checkpoint": "unused.pt"}, "models": models})
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    with caplog.at_level("WARNING", logger="deployments.app"):
        build_app(cfg)
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    with caplog.at_level("WARNING", logger="deployments.app"):
        build_app(cfg)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in caplog.text


def _fake_haproxy(tmp_path):
    """A stand-in HAProxy that prints the parent-death signal it was started with, then its arguments."""
    import sys

    real = tmp_path / "fake-haproxy"
    real.write_text(
        f"#!{sys.executable}\n"
        "import ctypes, sys\n"
        "v = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
        "print(v.value, *sys.argv[1:])\n"
    )
    real.chmod(0o755)
    return real


def _run_under_a_ray_worker(cmd: list[str]):
    """Run `cmd` from a parent whose command line starts with "ray::", as Ray's HAProxyManager worker's does."""
    import shlex
    import subprocess
    import sys

    spawn = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    line = f"exec -a ray::HAProxyManager {shlex.quote(sys.executable)} -c {shlex.quote(spawn)} {shlex.join(cmd)}"
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True)


def test_haproxy_launcher_sets_the_parent_death_signal(tmp_path, monkeypatch):
    """HAProxy outlived a killed Ray in 2 of 7 runs of test_haproxy.py's kill; the launcher execs it with
    PR_SET_PDEATHSIG (SIGTERM), and refuses to start it once the Ray worker that asked is gone."""
    import signal
    import subprocess

    from banditrouter.ray_local import haproxy_launcher

    monkeypatch.setenv("BANDITROUTER_CACHE_DIR", str(tmp_path / "cache"))
    real = _fake_haproxy(tmp_path)
    assert subprocess.run([str(real)], capture_output=True, text=True).stdout.split() == ["0"]  # none by default
    launcher = haproxy_launcher(str(real))
    assert launcher == haproxy_launcher(str(real))  # written once, by content
    out = _run_under_a_ray_worker([launcher, "-db", "-f", "x.cfg"])
    assert out.stdout.split() == [str(int(signal.SIGTERM)), "-db", "-f", "x.cfg"], out.stderr
    orphan = subprocess.run([launcher], capture_output=True, text=True)  # its parent is not a Ray worker
    assert orphan.returncode != 0 and "is gone" in orphan.stderr and not orphan.stdout


def test_init_local_ray_wraps_haproxy_once(tmp_path, monkeypatch):
    """`proxy="haproxy"` points Ray at the launcher: Ray's binary by default, a user's own binary wrapped, and a
    second start (bench --suite starts Ray twice) wraps the binary, not the previous launcher."""
    import ray

    from banditrouter import ray_local

    monkeypatch.setenv("BANDITROUTER_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.setenv(var, "")  # restored after the test
    monkeypatch.setattr(ray, "init", lambda **kw: kw)

    ray_local.init_local_ray(proxy="haproxy")
    first = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and ray_local._is_launcher(first)
    assert repr(ray_local._haproxy_binary()) in open(first).read()
    ray_local.init_local_ray(proxy="haproxy")
    assert os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == first  # not a launcher of a launcher
    own = _fake_haproxy(tmp_path)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(own))
    ray_local.init_local_ray(proxy="haproxy")
    wrapped = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert ray_local._is_launcher(wrapped) and repr(str(own)) in open(wrapped).read()
    ray_local.init_local_ray(proxy="serve")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
