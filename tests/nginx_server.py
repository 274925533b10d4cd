"""Debian's real nginx with docs/gate.md's example server block, and a stand-in GUI behind it.

For tests/test_gate_nginx.py and bench/gate.py: no pytest and no fixtures here (bench/ imports it
without tests/conftest.py). The example block is taken from docs/gate.md between its BEGIN/END
lines, so the page cannot drift from what runs; ``fill`` changes only what the page says a site
changes (the two placeholders) and what a test must (the listen lines and the certificate paths),
each edit checked to apply exactly once.

nginx runs in the foreground (``daemon off``) with its own prefix, config, pid file, logs and temp
directories in the caller's directory, on 127.0.0.1 and a port it was free to take; its master
starts as root (as in production) and its workers run as the user the caller names.
"""

from __future__ import annotations

import html
import http.client
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from plumbing import stop_process

REPO = Path(__file__).resolve().parent.parent
GATE_DOC = REPO / "docs" / "gate.md"
NGINX = "/usr/sbin/nginx"
BEGIN = "# BEGIN linkus-gate example"
END = "# END linkus-gate example"


def example_block(doc: Path = GATE_DOC) -> str:
    """The text between the BEGIN and END lines (exactly one pair), those lines included."""
    text = doc.read_text(encoding="utf-8")
    found = re.findall(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}$", text, flags=re.S | re.M)
    if len(found) != 1:
        raise AssertionError(f"{doc}: want one {BEGIN!r} ... {END!r} block, found {len(found)}")
    return str(found[0])


def _once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, lambda _m: replacement, text, flags=re.M)
    if count != 1:
        raise AssertionError(f"the example block should have {pattern!r} once, has it {count} times")
    return new


def fill(block: str, *, upstream: str, linkus_web: str, port: int, cert: Path, key: Path) -> str:
    """The block as a site would use it: the two placeholders replaced; plus, for a test on loopback,
    its listen lines on 127.0.0.1:``port`` (the [::] one dropped) and the test's certificate."""
    for name in ("UPSTREAM", "LINKUS_WEB"):
        if name not in block:
            raise AssertionError(f"the example block has no {name} placeholder")
    text = re.sub(r"\bUPSTREAM\b", upstream, block)
    text = re.sub(r"\bLINKUS_WEB\b", linkus_web, text)
    text = _once(text, r"^(\s*)listen 443 ssl;$", f"    listen 127.0.0.1:{port} ssl;")
    text = _once(text, r"^\s*listen \[::\]:443 ssl;\n", "")
    text = _once(text, r"^\s*ssl_certificate\s+\S+;$", f"    ssl_certificate {cert};")
    return _once(text, r"^\s*ssl_certificate_key\s+\S+;$", f"    ssl_certificate_key {key};")


def wrap(server_blocks: str, where: Path, *, worker_user: str | None, worker_group: str | None = None,
         access_log: bool = True) -> str:
    """A whole nginx.conf around ``server_blocks``: everything nginx writes goes below ``where``
    (``access_log``: False for the benchmark, whose timings should not include a log write)."""
    user = f"user {worker_user} {worker_group or worker_user};\n" if worker_user else ""
    temps = "\n".join(f"    {kind}_temp_path {where / kind};" for kind in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {where / 'nginx.pid'};\nerror_log {where / 'error.log'} warn;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            "    default_type application/octet-stream;\n"
            f"    access_log {where / 'access.log' if access_log else 'off'};\n"
            f"{temps}\n"
            f"{server_blocks}\n"
            "}\n")


def self_signed(where: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (P-256, two days), for nginx and for the clients' trust."""
    cert, key = where / "gate-cert.pem", where / "gate-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    return cert, key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """One nginx master (foreground) with the config ``wrap`` made; ``stop`` ends it."""

    def __init__(self, where: Path, server_blocks: str, *, port: int, worker_user: str | None = None,
                 worker_group: str | None = None, access_log: bool = True):
        self.where = where
        self.port = port
        where.mkdir(parents=True, exist_ok=True)
        self.conf = where / "nginx.conf"
        self.conf.write_text(wrap(server_blocks, where, worker_user=worker_user,
                                    worker_group=worker_group, access_log=access_log))
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        return [NGINX, "-p", str(self.where), "-c", str(self.conf), *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t``: the config as nginx parses it, without starting anything."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30, check=False)

    def start(self, timeout: float = 15.0) -> None:
        stderr = (self.where / "stderr.log").open("ab")
        self.proc = subprocess.Popen(self.command("-g", "daemon off;"), stdout=subprocess.DEVNULL, stderr=stderr,
                                     cwd=str(self.where))
        stderr.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited {self.proc.returncode}: {self.errors()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"nginx did not listen on {self.port}: {self.errors()}")

    def errors(self) -> str:
        return "".join(path.read_text(errors="replace")[-3000:] for path in
                       (self.where / "stderr.log", self.where / "error.log") if path.exists())

    def stop(self) -> None:
        # SIGTERM is nginx's fast shutdown: the master ends its workers and exits
        stop_process(self.proc)


#: What an EchoUpstream answers a request with: the status and extra headers, from the request's record.
Answer = Callable[[dict[str, Any]], tuple[int, dict[str, str]]]


class EchoUpstream:
    """The protected GUI's stand-in: every request is answered 200 with a JSON object of the path,
    the method and the headers exactly as they arrived (a repeated header appears once per copy), and
    kept in ``seen`` (bounded) so a test can prove what did and what did not reach it.

    With ``answer`` it stands in for the gate's check instead (status and headers chosen per request,
    no body), so the example block's own wiring is tested apart from linkus-web."""

    def __init__(self, keep: int = 1000, answer: Answer | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.keep = keep
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(min(length, 65536))
                record = {"method": self.command, "path": self.path,
                          "headers": [[name, value] for name, value in self.headers.items()]}
                with upstream._lock:
                    if len(upstream.seen) < upstream.keep:
                        upstream.seen.append(record)
                status, extra = answer(record) if answer else (200, {})
                body = json.dumps(record).encode() if answer is None else b""
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        # a short poll: shutdown() waits for it, and every test stops two of these
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def header_values(record: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` (any case) in one request the echo upstream recorded."""
    return [value for key, value in record["headers"] if key.lower() == name.lower()]


# -- a browser without a browser: HTTPS with a cookie jar and forms ---------------------------------


class Reply:
    """One HTTP answer, read whole."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        found = [value for key, value in self.headers if key.lower() == name.lower()]
        return found[-1] if found else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_ATTR = re.compile(r'([\w-]+)\s*=\s*"([^"]*)"')
_INPUT = re.compile(r"<(?:input|button)\b([^>]*)>", re.I)


def forms(page: str) -> list[tuple[str, dict[str, str]]]:
    """The POST forms of a page: (action, {name: value}) of their named inputs, in page order."""
    found = []
    for attrs, inner in _FORM.findall(page):
        form = dict(_ATTR.findall(attrs))
        if form.get("method", "get").lower() != "post":
            continue
        fields = {}
        for tag in _INPUT.findall(inner):
            attr = {k: html.unescape(v) for k, v in _ATTR.findall(tag)}
            if "name" in attr and attr.get("type") != "submit":
                fields[attr["name"]] = attr.get("value", "")
        found.append((html.unescape(form.get("action", "")), fields))
    return found


class HttpsClient:
    """HTTPS to nginx on 127.0.0.1 trusting only the test's certificate; one connection per request;
    ``source`` is the client's loopback address. It keeps the cookies it is given (name=value, no
    attributes: one host), and fills and posts a page's forms as a browser would."""

    def __init__(self, port: int, cert: Path, *, source: str = "127.0.0.1"):
        self.port = port
        self.source = source
        self.context = ssl.create_default_context(cafile=str(cert))
        self.cookies: dict[str, str] = {}

    def __call__(self, path: str, *, method: str = "GET", headers: list[tuple[str, str]] | None = None,
                 body: bytes | None = None, form: dict[str, str] | None = None, jar: bool = True) -> Reply:
        """One request; ``jar``: send and keep this client's cookies (False: exactly ``headers``)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30,
                                           source_address=(self.source, 0))
        sent = list(headers or [])
        if form is not None:
            body = urlencode(form).encode()
            sent.append(("Content-Type", "application/x-www-form-urlencoded"))
        if jar and self.cookies:
            sent.append(("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items())))
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in sent:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            answer = conn.getresponse()
            reply = Reply(answer.status, answer.getheaders(), answer.read())
        finally:
            conn.close()
        if jar:
            for name, value in reply.headers:
                if name.lower() == "set-cookie":
                    self._keep(value)
        return reply

    def _keep(self, header: str) -> None:
        first, *attrs = header.split(";")
        name, _, value = first.strip().partition("=")
        gone = any(a.strip().lower() in ("max-age=0", "max-age=-1") or
                   a.strip().lower().startswith("expires=thu, 01 jan 1970") for a in attrs)
        if gone or not value.strip('"'):
            self.cookies.pop(name, None)
        else:
            self.cookies[name] = value

    def follow(self, reply: Reply, hops: int = 5) -> Reply:
        """Follow redirects on this host (path and query only), at most ``hops``."""
        for _ in range(hops):
            where = reply.header("Location")
            if reply.status not in (301, 302, 303, 307) or not where:
                return reply
            target = urlsplit(where)
            if target.netloc and target.netloc != f"127.0.0.1:{self.port}":
                return reply  # another host: the caller looks at the Location itself
            reply = self(target.path + (f"?{target.query}" if target.query else ""))
        return reply

    def submit(self, page: Reply, index: int = 0, **values: str) -> Reply:
        """Post form ``index`` of ``page`` with ``values`` filled in (each must be a field of it)."""
        found = forms(page.text)
        if len(found) <= index:
            raise AssertionError(f"no form {index} on the page: {page.text[:800]}")
        action, fields = found[index]
        unknown = set(values) - set(fields)
        if unknown:
            raise AssertionError(f"the form has no field {sorted(unknown)}; it has {sorted(fields)}")
        return self(action, method="POST", form={**fields, **values})


def gate_sign_in(client: HttpsClient, account: str, password: str, code: str | Callable[[], str],
                 rd: str = "") -> Reply:
    """The gate's sign-in as a browser does it: the sign-in form (``rd`` as given, not encoded here:
    the caller says what a browser would have in its address bar), then the code form (``code``: the
    code, or a function asked for it once the code step shows, e.g. to read an emailed one). The last
    answer (normally the redirect to the return URL), not followed."""
    page = client("/linkus-gate/sign-in" + (f"?rd={rd}" if rd else ""))
    if page.status != 200:
        raise AssertionError(f"sign-in page: {page.status} {page.text[:300]}")
    step = client.follow(client.submit(page, ext=account, password=password))
    if step.status != 200 or not any("code" in fields for _action, fields in forms(step.text)):
        return step  # no code step: refused (wrong password, locked, not enrolled...)
    index = next(i for i, (_action, fields) in enumerate(forms(step.text)) if "code" in fields)
    return client.submit(step, index, code=code if isinstance(code, str) else code())
