"""A real redis-server (Debian's) on 127.0.0.1 for the tests, and what it needs.

Each server gets a random free port, its own temp directory and config file, no
persistence (``save ''``, no AOF), and is stopped afterwards. ``stop``/``start``
restart it on the same port (Redis went away and came back); ``pause``/``resume``
SIGSTOP it, so clients connect (the kernel accepts into the backlog) but get no
answer: a Redis that times out. ``TlsFiles`` makes a throwaway CA, a server
certificate for 127.0.0.1, a rogue CA with its own certificate, and a certificate
from the right CA for the wrong name. ``Sentinel`` runs redis-sentinel watching
a master.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_server import HostileServer
from plumbing import stop_process

READY_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_log(proc: subprocess.Popen[bytes], log: Path, needle: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"redis exited with {proc.returncode}: {text[-2000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"redis not ready after {timeout}s: {log.read_text(errors='replace')[-2000:]}")


class TlsFiles:
    """Throwaway PKI made with the openssl command line."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.ca_cert, self.ca_key = self._ca("linkus-test-ca")
        self.server_cert, self.server_key = self._leaf("server", "IP:127.0.0.1,DNS:localhost", self.ca_cert,
                                                       self.ca_key)
        self.wrong_name_cert, self.wrong_name_key = self._leaf("wrongname", "DNS:other.example", self.ca_cert,
                                                               self.ca_key)
        self.rogue_ca_cert, rogue_ca_key = self._ca("linkus-rogue-ca")
        self.rogue_cert, self.rogue_key = self._leaf("rogue", "IP:127.0.0.1,DNS:localhost", self.rogue_ca_cert,
                                                     rogue_ca_key)

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.dir, timeout=60)

    def _ca(self, name: str) -> tuple[Path, Path]:
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
                      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
        return cert, key

    def _leaf(self, name: str, san: str, ca_cert: Path, ca_key: Path) -> tuple[Path, Path]:
        cert, key, csr = self.dir / f"{name}.crt", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
        self._openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
        self._openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                      "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return cert, key


class RedisServer:
    """One redis-server process; ``config_lines`` are extra redis.conf lines (ACL users, ...)."""

    def __init__(self, directory: Path, *, tls: tuple[Path, Path, Path] | None = None,
                 config_lines: list[str] | None = None, replica_of: int | None = None):
        self.dir = directory
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.tls = tls
        self.config_lines = list(config_lines or [])
        self.replica_of = replica_of
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"dir {self.dir}",
            "save ''",
            "appendonly no",
            "daemonize no",
            f"logfile {self.log}",
            "loglevel notice",
        ]
        if self.tls:
            cert, key, ca = self.tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        lines += self.config_lines
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        return conf

    def start(self) -> RedisServer:
        for _attempt in range(5):
            conf = self._write_config()
            self.log.unlink(missing_ok=True)
            self.proc = subprocess.Popen(["redis-server", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_for_log(self.proc, self.log, "Ready to accept connections")
                return self
            except RuntimeError as exc:
                self.stop()
                if "Address already in use" not in str(exc):
                    raise
                self.port = free_port()
        raise RuntimeError("no free port for redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must wake to hear SIGTERM
        stop_process(self.proc)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self, *, socket_timeout: float = 5, **kwargs: Any) -> Any:
        """A plain redis-py client for looking at what the store wrote."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=socket_timeout, decode_responses=True,
                           **kwargs)


class Sentinel:
    """redis-sentinel watching ``master_port`` as ``service``, quick to fail over."""

    def __init__(self, directory: Path, master_port: int, service: str,
                 tls: tuple[Path, Path, Path] | None = None, requirepass: str | None = None):
        self.dir = directory
        self.tls = tls
        self.requirepass = requirepass
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.port = free_port()
        self.service = service
        self.master_port = master_port
        self.log = self.dir / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        conf = self.dir / "sentinel.conf"  # sentinel rewrites its config, so it must be writable
        if self.tls:
            cert, key, ca = self.tls
            listen = [f"tls-port {self.port}", "port 0", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      f"tls-ca-cert-file {ca}", "tls-auth-clients no", "tls-replication yes"]
        else:
            listen = [f"port {self.port}"]
        conf.write_text("\n".join([
            "bind 127.0.0.1",
            *listen,
            f"dir {self.dir}",
            f"logfile {self.log}",
            "daemonize no",
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1",
            f"sentinel down-after-milliseconds {self.service} 1000",
            f"sentinel failover-timeout {self.service} 10000",
            f"sentinel parallel-syncs {self.service} 1",
            *([f"requirepass {self.requirepass}"] if self.requirepass else []),
        ]) + "\n")
        os.chmod(conf, 0o600)
        self.proc = subprocess.Popen(["redis-sentinel", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_log(self.proc, self.log, "+monitor master")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def require_redis() -> None:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server must be installed (make deps-test installs it)")


# Fixtures are registered under their ``name`` so a test module can import them
# (``from redis_server import redis_server_fixture``) without shadowing its parameters.


@pytest.fixture(name="redis_dir")
def redis_dir_fixture() -> Iterator[Path]:
    path = Path(f"/tmp/linkus-redis-{secrets.token_hex(6)}")
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="redis_server")
def redis_server_fixture(redis_dir: Path) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(redis_dir / "server").start()
    yield server
    server.stop()


@pytest.fixture(name="tls_files", scope="session")
def tls_files_fixture() -> Iterator[TlsFiles]:
    path = Path(f"/tmp/linkus-pki-{secrets.token_hex(6)}")
    path.mkdir(mode=0o700)
    yield TlsFiles(path)
    shutil.rmtree(path, ignore_errors=True)


class HostileRedis(HostileServer):
    """A loopback 'Redis' that answers every command with ``reply`` (bytes), then,
    if ``drip``, one more byte every 0.2 s until the client leaves."""

    def __init__(self, reply: bytes, drip: bool = False):
        self.reply, self.drip = reply, drip
        super().__init__()

    def handle(self, conn: Any) -> None:
        conn.recv(65536)
        conn.sendall(self.reply)
        for _ in range(100):  # bounded: 20 s at most
            if not self.drip or self.stop.wait(0.2):
                break
            conn.sendall(b"x")
