"""LDAP and Redis for the benchmark: a real slapd and redis-server on loopback.

The servers come from the tests' own fixtures (tests/ldap_server.py,
tests/redis_server.py), so the benchmark measures the set-up the tests prove
correct: ldaps with a verified certificate, a bind DN with a password file.
Entries are loaded with slapadd before slapd starts, with ``index uid eq``: one slapd with
the bench users and 10 more entries, one with ``ldap_entries`` (100,000) entries, and a
``DelayProxy`` in front of the small one that adds a round trip (a directory far away).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from harness import SECRET, Workspace, median_ms


class Servers:
    def __init__(self, ws: Workspace, users: list[str], *, ldap: bool, redis: bool, ldap_entries: int = 0,
                 ldap_delay_ms: float = 0.0):
        self.ws = ws
        self.slapd: Any = None
        self.slapd_big: Any = None
        self.proxy: Any = None
        self.redis: Any = None
        self.base = ""
        self.password_file: Path | None = None
        self.big_password_file: Path | None = None
        self.problems: list[str] = []
        if ldap:
            try:
                self.slapd, self.password_file = self._start_ldap("slapd", users, 10)
                if ldap_entries:
                    self.slapd_big, self.big_password_file = self._start_ldap("slapd-big", users, ldap_entries)
                if ldap_delay_ms:
                    from delay_proxy import DelayProxy

                    self.proxy = DelayProxy(self.slapd.tls_port, ldap_delay_ms / 2000)
            except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
                self.problems.append(f"LDAP cases skipped: {type(exc).__name__}: {exc}"[:300])
                self.close()
                self.slapd = self.slapd_big = self.proxy = None
        if redis:
            try:
                from redis_server import RedisServer

                self.redis = RedisServer(ws.root / "redis").start()
            except (ImportError, OSError, RuntimeError) as exc:
                self.problems.append(f"Redis cases skipped: {type(exc).__name__}: {exc}"[:300])
                self.redis = None

    def _start_ldap(self, name: str, users: list[str], total: int) -> tuple[Any, Path]:
        """A slapd with the bench users and filler up to ``total`` entries (bench/linkus.py's names)."""
        from ldap_server import SCHEMA_ATTRIBUTES, SUFFIX, Pki, Slapd, write_password

        root = self.ws.root / name
        root.mkdir(mode=0o700)
        slapd = Slapd(root, Pki(root / "pki"))
        conf = slapd.conf.read_text().replace("maxsize 67108864", "maxsize 4294967296")  # room for 100,000
        slapd.conf.write_text(conf + "index objectClass eq\nindex uid eq\n")
        self.base = f"ou=bench,{SUFFIX}"
        ldif = [f"dn: {self.base}\nobjectClass: organizationalUnit\nou: bench\n"]
        for i, user in enumerate(users):
            ldif.append(_entry(self.base, f"u{i}", user, {"method": "totp", "secret": SECRET}, SCHEMA_ATTRIBUTES))
        for i in range(max(0, total - len(users))):
            ldif.append(_entry(self.base, f"e{i}", f"{100000 + i}", {"method": "totp", "secret": SECRET},
                               SCHEMA_ATTRIBUTES))
        subprocess.run(["slapadd", "-q", "-f", str(slapd.conf)], input="\n".join(ldif).encode(), check=True,
                       capture_output=True, timeout=600)
        subprocess.run(["slapindex", "-q", "-f", str(slapd.conf)], check=True, capture_output=True, timeout=600)
        slapd.start()
        return slapd, write_password(root / "bind.pw", slapd.pam_password)

    def ldap_config(self, which: str = "small", **overrides: Any) -> dict[str, Any]:
        """The ``ldap:`` section for the small directory, the large one or the far one (the
        small one behind the delaying proxy); ``overrides`` as in tests/ldap_server.py."""
        from ldap_server import ldap_config

        slapd, password_file = ((self.slapd_big, self.big_password_file) if which == "big"
                                else (self.slapd, self.password_file))
        assert slapd is not None and password_file is not None
        section = ldap_config(slapd, self.base, password_file, **overrides)
        if which == "far":
            section["uris"] = [f"ldaps://127.0.0.1:{self.proxy.port}"]
        return section

    def ldap_round_trip_ms(self, config_path: Path, user: str, rounds: int) -> float | None:
        """The directory's round trip as linkusd makes it: one search on a warm, bound
        connection, with the daemon's own LDAP source (ldap3, same search, same TLS), run in
        the bench process. This includes ldap3's encoding and decoding on the client side."""
        if self.slapd is None:
            return None
        from nss_config.ldap_source import LdapSource
        from pam_linkus.config import load_config

        source = LdapSource(load_config(str(config_path)).ldap)
        try:
            source.search(user)  # connect, TLS, bind: the connection is warm from here on
            times = []
            for _ in range(max(rounds, 20)):
                started = time.perf_counter()
                source.search(user)
                times.append(time.perf_counter() - started)
        finally:
            source.close()
        return round(median_ms(times), 3)

    def redis_config(self, prefix: str) -> dict[str, Any]:
        return {"backend": "redis", "redis": {"url": self.redis.url, "prefix": prefix}}

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for slapd in (self.slapd, self.slapd_big):
            if slapd is not None:
                slapd.stop()
        if self.redis is not None:
            self.redis.stop()


def _entry(base: str, rdn: str, uid: str, entry: dict[str, Any], attributes: dict[str, str]) -> str:
    lines = [f"dn: cn={rdn},{base}", "objectClass: inetOrgPerson", "objectClass: linkusTwoFactorAccount",
             f"cn: {rdn}", f"sn: {rdn}", f"uid: {uid}"]
    for key, value in entry.items():
        lines.append(f"{attributes[key]}: {value}")
    return "\n".join(lines) + "\n"
