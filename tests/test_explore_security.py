"""``hspace explore`` answers only its own site: Host names, origins, body types, upload size, token.

Every test talks to the real command (``python -m hspace.cli explore ...`` as a subprocess on a free
loopback port) over raw ``http.client`` or socket requests, so the Host header, missing lengths and
chunked bodies are exactly what the test writes. The browser tests drive a real headless Chromium:
a page served from a second origin (a tiny ``http.server`` on another loopback port) tries to read
the explorer's data and start renders, and a page whose name resolves to 127.0.0.1 (DNS
rebinding, simulated with Chromium's host resolver rules) tries the same from "its own" origin.
"""

from __future__ import annotations

import http.client
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hspace.cli import app as cli_app
from hspace.explore.explorer import MAX_UPLOAD_BYTES
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.explore_catalog import MODEL, build_explore_catalog

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # a small catalog: these tests are about requests, not images


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("explore_security") / "catalog"
        return {"path": path, **build_explore_catalog(str(path), steps=STEPS, n_samples=12)}
    finally:
        torch.set_num_threads(threads)


@dataclass
class Explorer:
    """A running ``hspace explore`` process: its port, printed URL, token and output so far."""

    proc: subprocess.Popen
    port: int
    url: str
    token: str | None
    output: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()


def launch(catalog_path: Path, *args: str) -> Explorer:
    """Start ``hspace explore CATALOG --port 0 ARGS`` and wait for the line with its URL."""
    cmd = [sys.executable, "-m", "hspace.cli", "explore", str(catalog_path), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            proc.wait(30)
            pytest.fail("hspace explore exited before printing its URL:\n" + "".join(lines))
        lines.append(line)
        match = re.search(r" on (http://(\S+?):(\d+)/(?:\?token=(\S+))?) \(Ctrl-C stops\)", line)
        if match:
            return Explorer(proc, int(match.group(3)), match.group(1), match.group(4), lines)


@pytest.fixture(scope="module")
def served(catalog):
    """The explorer on 127.0.0.1 (no token), also answering two names given with --allow-host."""
    ex = launch(catalog["path"], "--allow-host", "lab.example", "--allow-host", "proxy.example:8443")
    yield ex
    ex.stop()


def request(
    port: int,
    method: str,
    path: str,
    *,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request with exactly the Host header given (default 127.0.0.1:port)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def render_body(**extra) -> bytes:
    body = {"client": "t", "seq": int(time.monotonic_ns()), "model": MODEL, "version": "latest", "seeds": [0]}
    return json.dumps({**body, **extra}).encode()


def stats(port: int) -> dict:
    status, _, data = request(port, "GET", "/api/stats")
    assert status == 200, data
    return json.loads(data)


def activity(port: int) -> int:
    """Everything the render queue did so far: a refused request adds nothing."""
    s = stats(port)
    return s["rendered"] + s["superseded"] + s["tasks"] + s["batches"]


JSON = {"Content-Type": "application/json"}


# ------------------------------------------------------------------------- Host names (DNS rebinding)
@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "[::1]:{port}", "127.0.0.1", "lab.example"],
)
def test_the_names_the_server_is_bound_for_are_answered(served, host):
    status, _, data = request(served.port, "GET", "/api/catalog", host=host.format(port=served.port))
    assert status == 200, data
    assert json.loads(data)["models"][0]["name"] == MODEL


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{port}",
        "evil.example",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example:{port}",
        "lab.example.evil.example:{port}",
        "127.0.0.1:{other}",  # the right name on another port: not this server's address
        "proxy.example:{port}",  # allowed on port 8443 only
        "127.0.0.1:{port}@evil.example",
        "::1",  # IPv6 without brackets
        "",
    ],
)
def test_a_host_header_naming_another_site_is_refused_with_400(served, host):
    value = host.format(port=served.port, other=served.port + 1 if served.port < 65535 else 1)
    for path in ("/api/catalog", "/"):
        status, _, data = request(served.port, "GET", path, host=value)
        assert status == 400, (path, value, status, data[:200])
    status, _, _ = request(served.port, "POST", "/api/render", host=value, headers=JSON, body=render_body())
    assert status == 400


def test_a_name_allowed_with_a_port_is_answered_on_that_port(served):
    status, _, _ = request(served.port, "GET", "/api/catalog", host="proxy.example:8443")
    assert status == 200


def test_a_request_without_a_host_header_is_refused(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as s:
        s.sendall(b"GET /api/catalog HTTP/1.0\r\n\r\n")
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


def test_a_malformed_allow_host_exits_2_before_any_work(tmp_path):
    for value in ("http://lab.example/", "*.example", "lab.example:99999", "::1"):
        res = CliRunner().invoke(cli_app, ["explore", str(tmp_path / "nowhere"), "--allow-host", value])
        assert res.exit_code == 2, (value, res.output)
        assert "--allow-host" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("gpu-box.lab", False),
    ],
)
def test_only_loopback_binds_go_without_a_token_by_default(host, loopback):
    from hspace.explore.guard import is_loopback

    assert is_loopback(host) is loopback


# ------------------------------------------------------------------------- origins and body types
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://127.0.0.1:9"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:{port}.evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port of 127.0.0.1 is the same site, not origin
    ],
)
def test_api_requests_from_another_origin_are_refused_with_403(served, headers):
    headers = {k: v.format(port=served.port) for k, v in headers.items()}
    before = activity(served.port)
    status, _, data = request(served.port, "GET", f"/api/version?model={MODEL}&ref=latest", headers=headers)
    assert status == 403, data
    assert b"glasses" not in data
    for content_type in ("text/plain", "application/json"):
        status, _, _ = request(
            served.port,
            "POST",
            "/api/render",
            headers={**headers, "Content-Type": content_type},
            body=render_body(edits={"glasses": 1.0}),
        )
        assert status == 403
    assert activity(served.port) == before  # nothing reached the render queue


def test_requests_from_the_servers_own_origin_are_answered(served):
    own = {"Origin": f"http://127.0.0.1:{served.port}", "Sec-Fetch-Site": "same-origin"}
    status, _, data = request(served.port, "GET", "/api/catalog", headers=own)
    assert status == 200, data
    status, _, data = request(served.port, "POST", "/api/render", headers={**own, **JSON}, body=render_body())
    assert status == 200, data
    assert json.loads(data)["images"][0].startswith("data:image/png;base64,")
    # the origin of an allowed name, sent to that name
    named = {"Origin": "http://lab.example", "Host": "lab.example"}
    status, _, _ = request(served.port, "GET", "/api/catalog", host=named.pop("Host"), headers=named)
    assert status == 200


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"]
)
def test_json_endpoints_refuse_other_body_types_with_415(served, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    before = activity(served.port)
    for path, body in [
        ("/api/render", render_body()),
        ("/api/preempt", b'{"client": "t", "seq": 1}'),
        (
            "/api/swap",
            json.dumps({"model": MODEL, "version": "latest", "seeds_a": [0], "seeds_b": [1]}).encode(),
        ),
    ]:
        status, _, data = request(served.port, "POST", path, headers=headers, body=body)
        assert status == 415, (path, status, data)
        assert b"application/json" in data
    assert activity(served.port) == before


def test_json_with_a_charset_parameter_is_accepted(served):
    headers = {"Content-Type": "application/json; charset=utf-8"}
    status, _, data = request(
        served.port, "POST", "/api/preempt", headers=headers, body=b'{"client":"t","seq":1}'
    )
    assert status == 200 and json.loads(data) == {"cancelled": False}


def test_the_page_may_not_be_framed_by_other_sites(served):
    status, headers, _ = request(served.port, "GET", "/")
    assert status == 200
    assert (
        headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in headers["content-security-policy"]
    )


# ------------------------------------------------------------------------- strict request bodies
@pytest.mark.parametrize(
    ("path", "body", "unknown", "accepted"),
    [
        ("/api/render", {"directions": {"glasses": 2.0}}, "'directions'", "edits"),
        ("/api/render", {"edits": {"glasses": 1.0}, "seed": 3, "unit": "raw"}, "'seed', 'unit'", "units"),
        ("/api/preempt", {"client": "t", "seq": 2, "force": True}, "'force'", "seq"),
        (
            "/api/swap",
            {"model": MODEL, "version": "latest", "seeds_a": [0], "seeds_b": [1], "seed_c": [2]},
            "'seed_c'",
            "seeds_b",
        ),
    ],
)
def test_an_unknown_body_key_is_a_400_naming_it_and_the_accepted_keys(served, path, body, unknown, accepted):
    if path == "/api/render":
        body = {**json.loads(render_body()), **body}
    before = activity(served.port)
    status, _, data = request(served.port, "POST", path, headers=JSON, body=json.dumps(body).encode())
    assert status == 400, data
    error = json.loads(data)["error"]
    assert unknown in error and "accepted:" in error and accepted in error.split("accepted:")[1], error
    assert activity(served.port) == before


# ------------------------------------------------------------------------- uploads
def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def _upload_head(port: int, extra: str) -> bytes:
    return (
        f"POST /api/invert?model={MODEL}&ref=latest HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\n{extra}\r\n"
    ).encode()


def _read_status_line(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_a_chunked_upload_over_the_limit_is_refused_while_it_is_still_being_sent(served):
    """A chunked body without Content-Length, never finished: a server that read the whole body
    before checking its size would never answer; this one answers 413 once it passes the limit."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=60)
    sent = [0]

    def send_forever() -> None:  # up to 4x the limit, then stall without the final chunk
        chunk = os.urandom(64 * 1024)
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        try:
            sock.sendall(_upload_head(served.port, "Transfer-Encoding: chunked\r\n"))
            while sent[0] < 4 * MAX_UPLOAD_BYTES:
                sock.sendall(frame)
                sent[0] += len(chunk)
        except OSError:  # the server answered and closed the connection
            pass

    sender = threading.Thread(target=send_forever, daemon=True)
    sender.start()
    try:
        reply = _read_status_line(sock, timeout=60)
    finally:
        sock.close()
        sender.join(10)
    assert reply.startswith(b"HTTP/1.1 413"), (reply[:300], sent[0])
    assert b"more than the" in reply or b"413" in reply
    assert MAX_UPLOAD_BYTES < sent[0] < 4 * MAX_UPLOAD_BYTES  # refused before the sender was done
    assert stats(served.port)["rendered"] >= 0  # and the server still answers


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_sent(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        sock.sendall(_upload_head(served.port, f"Content-Length: {10**12}\r\n"))
        reply = _read_status_line(sock, timeout=60)  # not one byte of the body was sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]


def test_a_chunked_upload_under_the_limit_is_inverted(served):
    from hspace.toy.world import render_face, sample_factors

    buf = io.BytesIO()
    render_face(sample_factors(3)).save(buf, format="PNG")
    png = buf.getvalue()
    with socket.create_connection(("127.0.0.1", served.port), timeout=300) as sock:
        body = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in (png[:100], png[100:])) + b"0\r\n\r\n"
        sock.sendall(_upload_head(served.port, "Transfer-Encoding: chunked\r\nConnection: close\r\n") + body)
        reply = _read_all(sock)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    result = json.loads(payload)
    assert result["steps"] == STEPS and result["psnr"] > 10


def test_an_upload_must_be_octet_stream_or_an_image_type(served):
    status, _, data = request(
        served.port,
        "POST",
        f"/api/invert?model={MODEL}&ref=latest",
        headers={"Content-Type": "text/plain"},
        body=b"\x89PNG not really",
    )
    assert status == 415, data


# ------------------------------------------------------------------------- the access token
@pytest.fixture(scope="module")
def with_token(catalog):
    """The explorer on loopback with --token: the same checks a non-loopback bind turns on."""
    ex = launch(catalog["path"], "--token")
    yield ex
    ex.stop()


def test_token_is_printed_in_the_url_and_required_on_every_api_request(with_token):
    ex = with_token
    assert ex.url.startswith(f"http://127.0.0.1:{ex.port}/?token=") and len(ex.token or "") >= 40
    for path in ("/api/catalog", f"/api/version?model={MODEL}&ref=latest", "/api/stats"):
        status, headers, data = request(ex.port, "GET", path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", (path, data)
    status, _, _ = request(ex.port, "POST", "/api/render", headers=JSON, body=render_body())
    assert status == 401
    status, _, _ = request(ex.port, "GET", "/api/catalog", headers={"Authorization": "Bearer " + "x" * 43})
    assert status == 403
    status, _, _ = request(ex.port, "GET", f"/api/catalog?token={ex.token}")  # the URL form is for / only
    assert status == 401
    status, _, data = request(ex.port, "GET", "/api/catalog", headers={"Authorization": f"Bearer {ex.token}"})
    assert status == 200 and json.loads(data)["models"][0]["name"] == MODEL


def test_the_token_url_sets_an_httponly_samesite_strict_cookie_that_then_suffices(with_token):
    ex = with_token
    status, _, _ = request(ex.port, "GET", "/")
    assert status == 401  # the page itself needs the token too
    status, _, _ = request(ex.port, "GET", "/?token=wrong")
    assert status == 403
    status, headers, _ = request(ex.port, "GET", f"/?token={ex.token}")
    assert status == 303 and headers["location"] == "/"  # the token leaves the address bar
    cookie = headers["set-cookie"]
    name_value = cookie.split(";")[0]
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert name_value == f"hspace_explore_token_{ex.port}={ex.token}"
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    status, _, data = request(ex.port, "GET", "/", headers={"Cookie": name_value})
    assert status == 200 and b"hspace explore" in data
    status, _, data = request(ex.port, "GET", "/api/catalog", headers={"Cookie": name_value})
    assert status == 200
    tampered = name_value[:-1] + ("B" if name_value.endswith("A") else "A")  # one character changed
    status, _, _ = request(ex.port, "GET", "/api/catalog", headers={"Cookie": tampered})
    assert status == 403


def test_the_token_does_not_replace_the_origin_and_host_checks(with_token):
    ex = with_token
    auth = {"Authorization": f"Bearer {ex.token}"}
    status, _, _ = request(ex.port, "GET", "/api/catalog", host=f"evil.example:{ex.port}", headers=auth)
    assert status == 400
    status, _, _ = request(ex.port, "GET", "/api/catalog", headers={**auth, "Origin": "http://evil.example"})
    assert status == 403


@pytest.mark.slow
def test_a_non_loopback_host_warns_and_requires_a_fresh_token_unless_no_token(catalog, with_token):
    """--host 0.0.0.0 (every interface): a warning, a token in the URL, 401 without it; with
    --no-token the warning says so and no token is asked."""
    ex = launch(catalog["path"], "--host", "0.0.0.0")
    try:
        text = "".join(ex.output)
        assert "WARNING: listening on 0.0.0.0" in text and "storage credentials" in text
        assert ex.url.startswith(f"http://127.0.0.1:{ex.port}/?token=")
        assert ex.token and ex.token != with_token.token  # generated per launch
        status, _, _ = request(ex.port, "GET", "/api/catalog")
        assert status == 401
        status, _, _ = request(
            ex.port, "GET", "/api/catalog", headers={"Authorization": f"Bearer {ex.token}"}
        )
        assert status == 200
    finally:
        ex.stop()
    ex = launch(catalog["path"], "--host", "0.0.0.0", "--no-token")
    try:
        assert "--no-token" in "".join(ex.output) and ex.token is None
        status, _, _ = request(ex.port, "GET", "/api/catalog")
        assert status == 200
        status, _, _ = request(ex.port, "GET", "/api/catalog", host=f"evil.example:{ex.port}")
        assert status == 400  # the Host check stays on
    finally:
        ex.stop()


# ------------------------------------------------------------------------- in a real browser
ATTACK_PAGE = """<!DOCTYPE html><html><body><script>
const E = "%(explorer)s", MODEL = "%(model)s";
const body = JSON.stringify({client: "attacker", seq: 1, model: MODEL, version: "latest", seeds: [0],
                             edits: {glasses: 2}});
async function attempt(name, fn) {
  try { return [name, "read", await fn()]; } catch (e) { return [name, "failed", String(e)]; }
}
async function imageLoads(src) {
  return new Promise((resolve) => { const i = new Image(); i.onload = () => resolve(true);
    i.onerror = () => resolve(false); i.src = src; });
}
window.attack = async () => [
  await attempt("catalog", async () => (await fetch(E + "/api/catalog")).text()),
  await attempt("version", async () => (await fetch(E + "/api/version?model=" + MODEL + "&ref=latest")).text()),
  await attempt("render-json", async () => (await fetch(E + "/api/render", {method: "POST",
    headers: {"content-type": "application/json"}, body})).text()),
  await attempt("render-plain", async () => {
    const r = await fetch(E + "/api/render", {method: "POST", mode: "no-cors",
      headers: {"content-type": "text/plain"}, body});
    return r.type === "opaque" ? "opaque: " + (await r.text()) : await r.text(); }),
  await attempt("swap-plain", async () => (await fetch(E + "/api/swap", {method: "POST", mode: "no-cors",
    headers: {"content-type": "text/plain"},
    body: JSON.stringify({model: MODEL, version: "latest", seeds_a: [0], seeds_b: [1]})})).type),
  ["preview-image", await imageLoads(E + "/api/preview/" + MODEL + "/%(version)s/previews/glasses.png")
    ? "loaded" : "failed", ""],
];
</script></body></html>"""


def _serve_directory(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # rebind.example resolves to 127.0.0.1, as a rebinding attacker's DNS would make it
        rules = "--host-resolver-rules=MAP rebind.example 127.0.0.1"
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, rules])
        yield browser
        browser.close()


def test_a_page_from_another_origin_can_neither_read_the_explorer_nor_start_renders(
    served, catalog, chromium, tmp_path
):
    explorer = f"http://127.0.0.1:{served.port}"
    page_text = ATTACK_PAGE % {"explorer": explorer, "model": MODEL, "version": catalog["new"]}
    (tmp_path / "attack.html").write_text(page_text)
    attacker, attacker_port = _serve_directory(tmp_path)
    context = chromium.new_context()
    try:
        before = activity(served.port)
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{attacker_port}/attack.html")
        results = {name: (outcome, detail) for name, outcome, detail in page.evaluate("attack()")}
        for name in ("catalog", "version", "render-json"):  # CORS-mode: the browser refuses the read
            assert results[name][0] == "failed", (name, results[name])
        assert results["render-plain"] == ("read", "opaque: "), results["render-plain"]
        assert results["preview-image"][0] == "failed"
        time.sleep(1.0)  # a render the server had accepted would be counted by now
        assert activity(served.port) == before

        # the control: the same script from the explorer's own origin reads and renders
        own = context.new_page()
        own.goto(explorer + "/")
        own.add_script_tag(content=page_text.split("<script>")[1].split("</script>")[0])
        own_results = {name: (outcome, detail) for name, outcome, detail in own.evaluate("attack()")}
        assert own_results["catalog"][0] == "read" and MODEL in own_results["catalog"][1]
        assert own_results["render-json"][0] == "read" and "images" in own_results["render-json"][1]
        assert own_results["preview-image"][0] == "loaded"
    finally:
        context.close()
        attacker.shutdown()


def test_a_rebound_dns_name_gets_400_in_the_browser(served, chromium):
    context = chromium.new_context()
    try:
        page = context.new_page()
        response = page.goto(f"http://rebind.example:{served.port}/")
        assert response is not None and response.status == 400
        status = page.evaluate("fetch('/api/catalog').then(r => r.status)")  # "same origin" to the page
        assert status == 400
    finally:
        context.close()


def test_the_printed_token_url_opens_the_page_which_then_renders_with_its_cookie(with_token, chromium):
    context = chromium.new_context()
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(with_token.url)
        assert page.url == f"http://127.0.0.1:{with_token.port}/"  # the token left the address bar
        page.wait_for_function("Number(document.querySelector('#result').dataset.seq) >= 1", timeout=120_000)
        assert page.locator("tr[data-name]").count() > 0
        assert with_token.token not in page.evaluate("document.cookie")  # HttpOnly: no script reads it
        (cookie,) = [c for c in context.cookies() if c["name"].startswith("hspace_explore_token_")]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert not errors, errors
        fresh = chromium.new_context()  # another browser profile without the cookie
        try:
            response = fresh.new_page().goto(f"http://127.0.0.1:{with_token.port}/")
            assert response is not None and response.status == 401
        finally:
            fresh.close()
    finally:
        context.close()
