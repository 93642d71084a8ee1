"""banditrouter.ray_local's HAProxy parts: `server.proxy` is validated, and the worker hook makes Ray's HAProxy
config bind its stats and Prometheus listeners where the HTTP frontend binds (rendered here with Ray's own
template and config class; tests/integration/test_haproxy.py checks the sockets of a running app)."""

from __future__ import annotations

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


def test_haproxy_launcher_sets_the_parent_death_signal(tmp_path, monkeypatch):
    """HAProxy outlived a killed Ray in 2 of 7 runs of test_haproxy.py's kill; the launcher execs it with
    PR_SET_PDEATHSIG (SIGTERM). A stand-in binary reports the signal it was started with."""
    import signal
    import subprocess
    import sys

    from banditrouter.ray_local import haproxy_launcher

    monkeypatch.setenv("BANDITROUTER_CACHE_DIR", str(tmp_path / "cache"))
    real = tmp_path / "fake-haproxy"
    real.write_text(
        f"#!{sys.executable}\n"
        "import ctypes, sys\n"
        "v = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
        "print(v.value, *sys.argv[1:])\n"
    )
    real.chmod(0o755)
    assert subprocess.run([str(real)], capture_output=True, text=True).stdout.split() == ["0"]  # none by default
    launcher = haproxy_launcher(str(real))
    assert launcher == haproxy_launcher(str(real))  # written once, by content
    out = subprocess.run([launcher, "-db", "-f", "x.cfg"], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(int(signal.SIGTERM)), "-db", "-f", "x.cfg"]
