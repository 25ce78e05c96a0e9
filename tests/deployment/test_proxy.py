"""The SuperLink's public listener (Caddy): only POST /v1/fleet/* reaches the SuperLink.

The Caddyfile is checked as text, as Caddy's own adapter reads it (``caddy adapt``),
and live: a real Caddy in front of a stub HTTPS upstream that records every request
that reaches it.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from deployment import consortium as cons
from deployment import pki, proxy
from deployment.processes import free_port

CADDY = str(Path(sys.executable).with_name("caddy")) \
    if Path(sys.executable).with_name("caddy").exists() else (shutil.which("caddy") or "caddy")


def _settings(tmp_path: Path, **kw) -> proxy.ProxySettings:
    base = dict(listen_port=8000, superlink="127.0.0.1:9093", cert=tmp_path / "server.pem",
                key=tmp_path / "server.key", ca_cert=tmp_path / "ca.pem")
    return proxy.ProxySettings(**{**base, **kw})


def _adapted(text: str, tmp_path: Path) -> dict:
    """Caddy's JSON config of a Caddyfile (its own parser; no listener is opened)."""
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    out = subprocess.run([CADDY, "adapt", "--adapter", "caddyfile", "--config", str(path)],
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def _handlers(node) -> list[dict]:
    """Every handler object anywhere in a Caddy JSON config."""
    found = []
    if isinstance(node, dict):
        if "handler" in node:
            found.append(node)
        for value in node.values():
            found += _handlers(value)
    elif isinstance(node, list):
        for value in node:
            found += _handlers(value)
    return found


def test_only_post_fleet_paths_are_proxied_and_everything_else_is_refused(tmp_path):
    config = _adapted(proxy.caddyfile(_settings(tmp_path)), tmp_path)

    assert config["admin"]["disabled"] is True  # no admin API on localhost:2019
    server = config["apps"]["http"]["servers"]["srv0"]
    assert server["listen"] == [":8000"]  # every interface when no listen host is given
    assert server["protocols"] == ["h1", "h2"]  # no HTTP/3 listener on UDP
    proxied = [r for r in server["routes"]
               if any(h["handler"] == "reverse_proxy" for h in _handlers(r))]
    assert len(proxied) == 1
    assert proxied[0]["match"] == [{"method": ["POST"], "path": ["/v1/fleet/*"]}]
    (upstream,) = [h for h in _handlers(proxied[0]) if h["handler"] == "reverse_proxy"]
    assert upstream["upstreams"] == [{"dial": "127.0.0.1:9093"}]
    tls = upstream["transport"]["tls"]  # the loopback hop is TLS, checked against the CA
    assert tls["ca"]["pem_files"] == [str(tmp_path / "ca.pem")]
    assert tls["server_name"] == "127.0.0.1" and "insecure_skip_verify" not in tls
    (fallback,) = [r for r in server["routes"] if "match" not in r]
    responses = [h for h in _handlers(fallback) if h["handler"] == "static_response"]
    assert [h["status_code"] for h in responses] == [403]


def test_a_listen_host_binds_only_that_interface(tmp_path):
    config = _adapted(proxy.caddyfile(_settings(tmp_path, listen_host="127.0.0.1")), tmp_path)
    assert config["apps"]["http"]["servers"]["srv0"]["listen"] == ["127.0.0.1:8000"]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("cert", Path('/etc/a"b.pem'), "certificate"),
    ("key", Path("/etc/k\n}.key"), "key"),
    ("superlink", "no-port", "host:port"),
    ("listen_port", 0, "listen port"),
])
def test_settings_that_would_break_the_caddyfile_are_refused(tmp_path, field, value, match):
    with pytest.raises(proxy.ProxyError, match=match):
        proxy.caddyfile(_settings(tmp_path, **{field: value}))


def test_paths_with_spaces_are_quoted(tmp_path):
    folder = tmp_path / "my consortium"
    config = _adapted(proxy.caddyfile(_settings(folder)), tmp_path)
    text = json.dumps(config)
    assert str(folder / "ca.pem") in text and str(folder / "server.pem") in text


class _Upstream(BaseHTTPRequestHandler):
    """Records the path of every request that reaches it; answers 200."""

    seen: list[tuple[str, str]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.command, self.path))
        self.send_response(200)
        self.send_header("Content-Length", "8")
        self.end_headers()
        self.wfile.write(b"upstream")

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def live_proxy(tmp_path):
    """Caddy on a free port in front of a stub HTTPS 'SuperLink' on another."""
    c = cons.create(tmp_path / "c", name="t", names=pki.Names(), address="127.0.0.1:1",
                    local_port=free_port())
    upstream_port = int(c.local_address.rsplit(":", 1)[1])
    _Upstream.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", upstream_port), _Upstream)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(c.server_cert, c.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(proxy.caddyfile(cons.proxy_settings(
        c, listen_port=port, listen_host="127.0.0.1")))
    log = (tmp_path / "caddy.log").open("wb")
    caddy = subprocess.Popen(proxy.caddy_command(caddyfile, caddy=CADDY), stdout=log,
                             stderr=subprocess.STDOUT,
                             env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")})
    client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=str(c.ca_cert))
    try:
        for _ in range(300):  # up to about 30 s for Caddy to listen
            try:
                client.post("/v1/fleet/ready")
                break
            except httpx.TransportError:
                if caddy.poll() is not None:
                    raise AssertionError((tmp_path / "caddy.log").read_text()) from None
                threading.Event().wait(0.1)
        _Upstream.seen.clear()
        yield client
    finally:
        client.close()
        caddy.terminate()
        caddy.wait(timeout=30)
        log.close()
        server.shutdown()


def _send(client: httpx.Client, method: str, raw_path: bytes) -> httpx.Response:
    """A request with the path exactly as given (no client-side normalisation)."""
    url = client.base_url.copy_with(raw_path=raw_path)
    return client.send(client.build_request(method, url, content=b"x"))


def test_live_the_fleet_api_passes_and_control_runtime_and_docs_are_refused(live_proxy):
    ok = _send(live_proxy, "POST", b"/v1/fleet/pull-messages")
    assert (ok.status_code, ok.text) == (200, "upstream")
    assert _Upstream.seen == [("POST", "/v1/fleet/pull-messages")]

    for method, path in [("POST", b"/v1/control/list-runs"),
                         ("POST", b"/v1/control/register-node"),
                         ("POST", b"/v1/control/start-run"),
                         ("POST", b"/v1/runtime/acquire-task"),
                         ("GET", b"/docs"), ("GET", b"/openapi.json"), ("GET", b"/health"),
                         ("GET", b"/v1/fleet/get-run"),  # Fleet routes are POST only
                         ("POST", b"/V1/CONTROL/list-runs")]:
        reply = _send(live_proxy, method, path)
        assert reply.status_code == 403, (method, path, reply.status_code)
        assert "only the Fleet API" in reply.text
    assert _Upstream.seen == [("POST", "/v1/fleet/pull-messages")]


@pytest.mark.parametrize("raw_path", [
    b"/v1/fleet/../control/list-runs",
    b"/v1/fleet/%2e%2e/control/list-runs",
    b"/v1/fleet/..%2fcontrol/list-runs",
    b"/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs",
    b"//v1/control/list-runs",
    b"/v1/fleet//../../v1/control/list-runs",
])
def test_live_dot_segments_and_encodings_never_reach_another_api(live_proxy, raw_path):
    reply = _send(live_proxy, "POST", raw_path)
    for _, path in _Upstream.seen:  # whatever got through stays inside the Fleet API
        assert posixpath.normpath(unquote(path)).startswith("/v1/fleet/"), (raw_path, path)
    if not _Upstream.seen:
        assert reply.status_code == 403, (raw_path, reply.status_code)


# --- the generated consortium files ---------------------------------------------------


def test_create_points_sites_at_the_proxy_and_the_coordinator_at_loopback(tmp_path):
    c = cons.create(tmp_path / "c", name="t", address="link.example.org:8000", sites=("a",),
                    names=pki.split_names(["link.example.org"]))

    assert c.address == "link.example.org:8000" and c.local_address == "127.0.0.1:9093"
    server = _adapted(c.caddyfile.read_text(), tmp_path)["apps"]["http"]["servers"]["srv0"]
    assert server["listen"] == [":8000"]
    (upstream,) = [h for h in _handlers(server) if h["handler"] == "reverse_proxy"]
    assert upstream["upstreams"] == [{"dial": "127.0.0.1:9093"}]
    # The coordinator's flwr CLI talks to the SuperLink itself; a site's bundle, to Caddy.
    assert 'address = "127.0.0.1:9093"' in (c.flwr_home / "config.toml").read_text()
    site_script = (c.site_dir("a") / "start-supernode.sh").read_text()
    assert "--superlink link.example.org:8000" in site_script
    script = c.root / "superlink/start-superlink.sh"
    joined = " ".join(script.read_text().replace("\\\n", " ").split())
    assert f"caddy run --adapter caddyfile --config {c.caddyfile} &" in joined
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)  # valid bash


def test_create_refuses_one_port_for_the_proxy_and_the_superlink(tmp_path):
    with pytest.raises(cons.ConsortiumError, match="need different ports"):
        cons.create(tmp_path / "c", name="t", names=pki.Names(), address="127.0.0.1:9093")
    assert not (tmp_path / "c").exists()


@pytest.fixture
def stub_tools(tmp_path):
    """``flower-superlink`` and ``caddy`` stand-ins: each records its argv, then either
    exits with $<NAME>_EXIT or waits (a Python sleeping with a marker in its argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, var in (("flower-superlink", "SUPERLINK"), ("caddy", "CADDY")):
        (bin_dir / name).write_text(
            "#!/bin/sh\n"
            f'echo "$@" > "$RECORD/{name}.args"\n'
            f'if [ -n "${var}_EXIT" ]; then exit "${var}_EXIT"; fi\n'
            f"exec {sys.executable} -c 'import time; time.sleep(600)' \"$MARKER\"\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run_script(script: Path, stub_tools: Path, tmp_path: Path, **env: str):
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    marker = f"fedsft-stub-{tmp_path.name}"
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PATH": f"{stub_tools}{os.pathsep}{os.environ['PATH']}",
             "RECORD": str(record), "MARKER": marker, **env})
    return result, record, marker


def _gone(marker: str) -> bool:
    """No process with ``marker`` in its argv is left (waits a little for a killed one)."""
    import psutil

    for _ in range(100):
        left = [p for p in psutil.process_iter(["cmdline"])
                if marker in (p.info["cmdline"] or [])]
        if not left:
            return True
        psutil.wait_procs(left, timeout=0.1)
    return False


def test_start_script_stops_the_proxy_when_the_superlink_exits(tmp_path, stub_tools):
    c = cons.create(tmp_path / "c", name="t", names=pki.Names())
    result, record, marker = _run_script(c.root / "superlink/start-superlink.sh", stub_tools,
                                         tmp_path, SUPERLINK_EXIT="3")

    assert result.returncode == 3, result.stderr
    assert "a process exited (3); stopping the other" in result.stderr
    assert "--host 127.0.0.1 --port 9093" in (record / "flower-superlink.args").read_text()
    assert _gone(marker)  # the waiting caddy stand-in was stopped with it


def test_start_script_stops_the_superlink_when_the_proxy_exits(tmp_path, stub_tools):
    c = cons.create(tmp_path / "c", name="t", names=pki.Names())
    result, record, marker = _run_script(c.root / "superlink/start-superlink.sh", stub_tools,
                                         tmp_path, CADDY_EXIT="0")

    assert result.returncode == 1, result.stderr  # a clean exit still leaves no SuperLink
    assert (record / "caddy.args").read_text().split() == [
        "run", "--adapter", "caddyfile", "--config", str(c.caddyfile)]
    assert _gone(marker)


# --- the rehearsal's attack part (pure pieces; the e2e rehearsal runs them) ------------


def test_a_site_tries_the_six_control_api_calls_with_its_bundle_only(tmp_path):
    from deployment.registry import site_flwr_home
    from deployment.rehearsal import ADMIN_CALLS, site_admin_calls

    c = cons.create(tmp_path / "c", name="t", names=pki.Names(), sites=("a",))
    home = site_flwr_home(c, "a", tmp_path / "home")
    config = (home / "config.toml").read_text()
    assert f'address = "{c.address}"' in config  # the public address, not 127.0.0.1:9093
    assert f'root-certificates = "{c.site_dir("a") / "ca.pem"}"' in config

    calls = site_admin_calls(other_node_id=7, run_id=3, rogue_key=tmp_path / "k.pub",
                             app_dir=tmp_path)
    assert tuple(name for name, _ in calls) == ADMIN_CALLS
    assert dict(calls)["unregister another site"] == ["supernode", "unregister", "7"]
    assert dict(calls)["stop a run"] == ["stop", "3"]


def _access(status: int, uri: str) -> str:
    return json.dumps({"level": "info", "logger": "http.log.access.log0", "status": status,
                       "request": {"method": "POST", "uri": uri}})


def test_a_call_counts_as_refused_only_when_the_proxy_refused_a_control_path():
    from deployment.rehearsal import AdminAttempt, attempts_line, refused_paths

    lines = ["not json", _access(403, "/v1/control/stop-run"), _access(200, "/v1/fleet/x"),
             json.dumps({"logger": "tls", "msg": "cleaning storage unit"})]
    assert refused_paths(lines) == ("/v1/control/stop-run",)

    def attempt(returncode: int, paths: tuple[str, ...]) -> AdminAttempt:
        return AdminAttempt(name="stop a run", command=("stop", "1"), returncode=returncode,
                            refused_paths=paths, output="")

    refused = attempt(1, ("/v1/control/stop-run",))
    through = attempt(0, ())  # the CLI succeeded: the call reached the SuperLink
    failed_elsewhere = attempt(1, ())  # failed, but not at the proxy (a typo, a crash)
    assert [a.refused for a in (refused, through, failed_elsewhere)] == [True, False, False]
    assert attempts_line([refused, through, failed_elsewhere]) == (
        "admin calls through the site address: 3 attempted, 1 refused")
