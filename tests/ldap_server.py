"""A real OpenLDAP slapd for the tests, and throwaway PKI for its TLS.

Each ``Slapd`` runs Debian's /usr/sbin/slapd in the foreground with its own
slapd.conf, an mdb database in a private temp dir, the shipped schema
(packaging/ldap/linkus-2fa.schema), ldap:// (StartTLS) and ldaps:// on random
loopback ports, and ``-d stats`` logging to a file the tests read (to prove,
for example, that no bind was ever sent). The system's /etc/ldap config and
service are never used; only the stock schema files are included.

The certificates come from ``cryptography`` (python3-cryptography): a CA, a
server certificate for 127.0.0.1 and ``linkus-ldap.test`` (not ``localhost``,
so connecting by that name fails the host name check), and a second, unrelated
CA for "untrusted certificate" tests.

``Slapd.tree(entries)`` puts test entries under a fresh ``ou=t<random>`` so
tests that share one server never see each other's entries.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_server import HostileServer, tls_server_context
from plumbing import stop_process

from pam_linkus.config import LdapConfig

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "packaging" / "ldap" / "linkus-2fa.schema"
SLAPD = "/usr/sbin/slapd"
SUFFIX = "dc=linkus,dc=test"
ADMIN_DN = f"cn=admin,{SUFFIX}"
PAM_DN = f"cn=pam,{SUFFIX}"
WRITER_DN = f"cn=writer,{SUFFIX}"
SERVER_NAME = "linkus-ldap.test"

#: Our keys -> attributes of the shipped schema (the source's default map, with
#: the schema's own email attribute rather than ``mail``).
SCHEMA_ATTRIBUTES = {**LdapConfig.DEFAULT_ATTRIBUTES, "email": "linkusTwoFactorEmail"}


# -- PKI ------------------------------------------------------------------------------


class Pki:
    """CA + server certificate (and an unrelated CA) written as PEM files into ``root``."""

    def __init__(self, root: Path):
        root.mkdir(mode=0o700, exist_ok=True)
        self.ca_file = root / "ca.pem"
        self.other_ca_file = root / "other-ca.pem"
        self.cert_file = root / "server.pem"
        self.key_file = root / "server.key"
        ca_key, ca_cert = _make_ca("pam-linkus test CA")
        _, other_cert = _make_ca("some other CA")
        key, cert = _make_leaf(ca_key, ca_cert)
        from cryptography.hazmat.primitives import serialization

        pem = serialization.Encoding.PEM
        self.ca_file.write_bytes(ca_cert.public_bytes(pem))
        self.other_ca_file.write_bytes(other_cert.public_bytes(pem))
        self.cert_file.write_bytes(cert.public_bytes(pem))
        self.key_file.write_bytes(key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
        os.chmod(self.key_file, 0o600)


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(ca_key: Any, ca_cert: Any) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(SERVER_NAME)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# -- slapd ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BlackHole:
    """A TCP listener that completes handshakes (kernel backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


class Slapd:
    """One slapd process; see the module docstring."""

    def __init__(self, root: Path, pki: Pki):
        self.root = root
        self.pki = pki
        self.admin_password = secrets.token_urlsafe(12)
        self.pam_password = secrets.token_urlsafe(12)
        self.writer_password = secrets.token_urlsafe(12)
        self.log_path = root / "slapd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.tls_port = 0
        (root / "db").mkdir(mode=0o700)
        self.conf = root / "slapd.conf"
        self.conf.write_text(self._conf())
        self._load_base()

    @property
    def ldap_uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def _conf(self) -> str:
        schema = "/etc/ldap/schema"
        return f"""
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {SCHEMA}
pidfile {self.root}/slapd.pid
argsfile {self.root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {self.pki.ca_file}
TLSCertificateFile {self.pki.cert_file}
TLSCertificateKeyFile {self.pki.key_file}
disallow bind_anon
sizelimit 500
database mdb
maxsize 67108864
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {self.admin_password}
directory {self.root}/db
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{PAM_DN}" read by dn.exact="{WRITER_DN}" write by * none
"""

    def _load_base(self) -> None:
        ldif = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: linkus
o: pam-linkus tests

dn: {PAM_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: pam
userPassword: {self.pam_password}

dn: {WRITER_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: writer
userPassword: {self.writer_password}
"""
        subprocess.run(["slapadd", "-q", "-f", str(self.conf)], input=ldif.encode(), check=True,
                       capture_output=True, timeout=30)

    def start(self) -> None:
        """Start on fresh random ports (retried: another test may take a port first)."""
        last = ""
        for _ in range(5):
            self.port, self.tls_port = free_port(), free_port()
            urls = f"{self.ldap_uri}/ {self.ldaps_uri}/"
            log = open(self.log_path, "ab")  # handed to the child, closed below
            try:
                self.proc = subprocess.Popen([SLAPD, "-d", "256", "-f", str(self.conf), "-h", urls],
                                             stdout=log, stderr=log, start_new_session=True)
            finally:
                log.close()
            if self._wait_ready(10.0):
                return
            self.stop()
            last = self.log_path.read_text(errors="replace")[-800:]
        raise RuntimeError(f"slapd did not start: {last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                for port in (self.port, self.tls_port):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- entries ----------------------------------------------------------------------

    def admin(self) -> Any:
        import ldap3

        server = ldap3.Server(self.ldaps_uri, use_ssl=True, connect_timeout=5, get_info=ldap3.NONE,
                              tls=ldap3.Tls(validate=2, ca_certs_file=str(self.pki.ca_file)))
        return ldap3.Connection(server, ADMIN_DN, self.admin_password, auto_bind=True, receive_timeout=10,
                                raise_exceptions=True)

    def tree(self, entries: dict[str, dict[str, Any]] | None = None, *,
             attributes: dict[str, str] | None = None) -> str:
        """A fresh ``ou=`` with one inetOrgPerson per user (uid = the user name) carrying
        our keys mapped to LDAP attributes; returns the ou's DN (the search base).

        A value that is a list is written as that many values (multi-valued tests).
        ``attributes`` maps our keys to attribute names (default: the shipped schema).
        """
        attributes = attributes or SCHEMA_ATTRIBUTES
        base = f"ou=t{secrets.token_hex(4)},{SUFFIX}"
        conn = self.admin()
        try:
            conn.add(base, ["organizationalUnit"], {"ou": base.split(",")[0][3:]})
            for index, (user, entry) in enumerate((entries or {}).items()):
                self.add_entry(conn, base, f"e{index}", user, entry, attributes)
        finally:
            conn.unbind()
        return base

    @staticmethod
    def add_entry(conn: Any, base: str, rdn: str, user: str, entry: dict[str, Any],
                  attributes: dict[str, str] | None = None) -> str:
        attributes = attributes or SCHEMA_ATTRIBUTES
        classes = ["inetOrgPerson"]
        attrs: dict[str, Any] = {"cn": rdn, "sn": rdn, "uid": user}
        for key, value in entry.items():
            name = attributes.get(key, key)
            if name.startswith("linkus"):
                classes = ["inetOrgPerson", "linkusTwoFactorAccount"]
            attrs[name] = [_ldap_value(v) for v in value] if isinstance(value, list) else _ldap_value(value)
        dn = f"cn={rdn},{base}"
        conn.add(dn, classes, attrs)
        return dn


def _ldap_value(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)


def write_password(path: Path, password: str) -> Path:
    path.write_text(password + "\n")
    os.chmod(path, 0o600)
    return path


def ldap_config(slapd: Slapd, base: str, password_file: Path, **overrides: Any) -> dict[str, Any]:
    """The ``ldap:`` section of pam_linkus.yaml for ``slapd`` (ldaps, short timeouts)."""
    section: dict[str, Any] = {
        "uris": [slapd.ldaps_uri],
        "ca_file": str(slapd.pki.ca_file),
        "bind_dn": PAM_DN,
        "bind_password_file": str(password_file),
        "base": base,
        "filter": "(uid={user})",
        "attributes": dict(SCHEMA_ATTRIBUTES),
        "connect_timeout": 2,
        "timeout": 2,
        # Tests change entries mid-test and expect the next lookup to see it; the in-memory
        # cache's own tests (test_source_ldap, test_cli_ldap) set cache_ttl themselves.
        "cache_ttl": 0,
    }
    section.update(overrides)
    return section


# -- fixtures -------------------------------------------------------------------------
# Named *_fixture and registered under the short name: a test module imports the
# *_fixture functions, and its test arguments (``slapd``) do not shadow an import.


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not Path(SLAPD).exists():
        pytest.fail("slapd is not installed (make test installs it)")


@pytest.fixture(name="ldap_root", scope="session")
def ldap_root_fixture() -> Iterator[Path]:
    path = Path(f"/tmp/linkus-ldap-{secrets.token_hex(6)}")
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="pki", scope="session")
def pki_fixture(ldap_root: Path) -> Pki:
    return Pki(ldap_root / "pki")


@pytest.fixture(name="slapd", scope="session")
def slapd_fixture(ldap_root: Path, pki: Pki) -> Iterator[Slapd]:
    """One slapd shared by the session (tests use their own ``tree``)."""
    _require()
    root = ldap_root / "shared"
    root.mkdir(mode=0o700)
    server = Slapd(root, pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="own_slapd")
def own_slapd_fixture(ldap_root: Path, pki: Pki) -> Iterator[Slapd]:
    """A slapd of this test alone (for tests that stop it)."""
    _require()
    root = ldap_root / f"own-{secrets.token_hex(4)}"
    root.mkdir(mode=0o700)
    server = Slapd(root, pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="black_hole")
def black_hole_fixture() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def _ber(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


class EndlessReferences(HostileServer):
    """An ldaps server (the test CA's certificate) that accepts any bind and answers
    a search with search references and never a searchResDone (issue 12 item 10):
    ``pause`` seconds between references (0: a flood). Bounded: 3,000 references."""

    def __init__(self, pki: Any, pause: float):
        self.pause = pause
        super().__init__(context=tls_server_context(str(pki.cert_file), str(pki.key_file)))

    def handle(self, conn: Any) -> None:
        while not self.stop.is_set():
            request = conn.recv(4096)
            if not request:
                return
            msg_id = request[4]  # 30 LL 02 01 <id>: our client's ids are small
            op = request[5]
            if op == 0x60:  # bindRequest -> bindResponse success
                conn.sendall(_ber(0x30, _ber(0x02, bytes([msg_id])) + _ber(0x61, b"\x0a\x01\x00\x04\x00\x04\x00")))
            elif op == 0x63:  # searchRequest -> references, forever
                ref = _ber(0x30, _ber(0x02, bytes([msg_id])) + _ber(0x73, _ber(0x04, b"ldap://elsewhere.test/")))
                for _ in range(3000):
                    conn.sendall(ref)
                    if self.pause and self.stop.wait(self.pause):
                        return
                return
            else:
                return


class GarbageLdap(HostileServer):
    """An ldaps server (the test CA's certificate) that answers the first request
    of each connection with ``reply`` (malformed BER) and then waits; bounded:
    it serves until closed, each connection for at most 3 s."""

    conn_timeout = 3.0

    def __init__(self, pki: Any, reply: bytes):
        self.reply = reply
        super().__init__(context=tls_server_context(str(pki.cert_file), str(pki.key_file)))

    def handle(self, conn: Any) -> None:
        conn.recv(4096)
        conn.sendall(self.reply)
        conn.recv(4096)
