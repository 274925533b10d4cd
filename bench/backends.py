"""LDAP and Redis cases of the benchmark: a real slapd and redis-server on loopback.

The servers come from the tests' own fixtures (tests/ldap_server.py,
tests/redis_server.py), so the benchmark measures the set-up the tests prove
correct: ldaps with a verified certificate, a bind DN with a password file.

LDAP entries are loaded with slapadd before slapd starts (100,000 entries over
the wire would take minutes), one ``ou=`` per size, with ``index uid eq`` as any
directory of that size has. Every ou holds the bench user.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import REPO, SECRET, Workspace, median_ms
from linkus import LinkusSetup

sys.path.insert(0, str(REPO / "tests"))


class Servers:
    def __init__(self, ws: Workspace, user: str, sizes: list[int], *, ldap: bool, redis: bool):
        self.ws = ws
        self.slapd: Any = None
        self.redis: Any = None
        self.bases: dict[str, str] = {}
        self.password_file: Path | None = None
        self.problems: list[str] = []
        if ldap:
            try:
                self._start_ldap(user, sizes)
            except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
                self.problems.append(f"LDAP cases skipped: {type(exc).__name__}: {exc}"[:300])
                self.slapd = None
        if redis:
            try:
                from redis_server import RedisServer

                self.redis = RedisServer(ws.root / "redis").start()
            except (ImportError, OSError, RuntimeError) as exc:
                self.problems.append(f"Redis cases skipped: {type(exc).__name__}: {exc}"[:300])
                self.redis = None

    # -- servers ------------------------------------------------------------------------

    def _start_ldap(self, user: str, sizes: list[int]) -> None:
        from ldap_server import SCHEMA_ATTRIBUTES, SUFFIX, Pki, Slapd, write_password

        root = self.ws.root / "slapd"
        root.mkdir(mode=0o700)
        slapd = Slapd(root, Pki(root / "pki"))
        conf = slapd.conf.read_text().replace("maxsize 67108864", "maxsize 2147483648")
        slapd.conf.write_text(conf + "index objectClass eq\nindex uid eq\n")
        ldif = []
        for name, count in [("main", 10)] + [(f"s{n}", n) for n in sizes]:
            base = f"ou={name},{SUFFIX}"
            self.bases[name] = base
            ldif.append(f"dn: {base}\nobjectClass: organizationalUnit\nou: {name}\n")
            ldif.append(_entry(base, "e0", user, {"method": "totp", "secret": SECRET}, SCHEMA_ATTRIBUTES))
            for i in range(count - 1):
                kind = ("totp", "email", "none")[i % 3]
                entry: dict[str, Any] = {"method": kind}
                if kind == "totp":
                    entry["secret"] = SECRET
                elif kind == "email":
                    entry["email"] = f"ext{i}@pbx.example"
                ldif.append(_entry(base, f"e{i + 1}", f"{100000 + i}", entry, SCHEMA_ATTRIBUTES))
        started = time.monotonic()
        subprocess.run(["slapadd", "-q", "-f", str(slapd.conf)], input="\n".join(ldif).encode(), check=True,
                       capture_output=True, timeout=900)
        subprocess.run(["slapindex", "-q", "-f", str(slapd.conf)], check=True, capture_output=True, timeout=900)
        self.load_seconds = round(time.monotonic() - started, 1)
        slapd.start()
        self.slapd = slapd
        self.password_file = write_password(root / "bind.pw", slapd.pam_password)

    def ldap_config(self, base: str) -> dict[str, Any]:
        from ldap_server import ldap_config

        assert self.password_file is not None
        return ldap_config(self.slapd, base, self.password_file)

    # -- cases --------------------------------------------------------------------------

    def cases(self, ws: Workspace, user: str, setups: list[LinkusSetup]) -> list[tuple[str, LinkusSetup]]:
        out = []
        if self.slapd is not None:
            setup = LinkusSetup(ws, "ldap", [user], config={"sources": ["ldap"],
                                                           "ldap": self.ldap_config(self.bases["main"])})
            setups.append(setup)
            out.append(("pam_unix + pam-linkus (LDAP, SQLite)", setup))
        if self.redis is not None:
            setup = LinkusSetup(ws, "redis", [user], config={
                "state": {"backend": "redis", "redis": {"url": self.redis.url, "prefix": "bench:"}}})
            setups.append(setup)
            out.append(("pam_unix + pam-linkus (YAML, Redis)", setup))
        return out

    def size_cases(self, ws: Workspace, user: str, n: int, setups: list[LinkusSetup]) -> list[tuple[str, LinkusSetup]]:
        if self.slapd is None:
            return []
        setup = LinkusSetup(ws, f"ldap{n}", [user], config={"sources": ["ldap"],
                                                             "ldap": self.ldap_config(self.bases[f"s{n}"])})
        setups.append(setup)
        return [(f"LDAP, {n:,} extensions", setup)]

    def ldap_round_trip_ms(self, rounds: int) -> float | None:
        """The directory's own round trip as a login makes it: TCP + TLS connect, bind, search,
        unbind, through the login's own client (nss_config.ldap_wire, already imported, context
        built once), so this is the server, the network and the TLS handshake, not our imports.

        (It used ldap3, which leaves Nagle's algorithm on: its bind waited for a delayed ACK,
        which added about 40 ms to the "round trip" and flattered the target.)"""
        if self.slapd is None:
            return None
        from ldap_server import PAM_DN

        from nss_config import ldap_wire

        context = ldap_wire.tls_context(str(self.slapd.pki.ca_file))
        attributes = ["linkusTwoFactorEnabled", "linkusTwoFactorMethod", "linkusTotpSecret"]
        times = []
        for _ in range(max(rounds, 10)):
            started = time.perf_counter()
            ldap_wire.search(self.slapd.ldaps_uri, context, start_tls=True, connect_timeout=2, timeout=2,
                             bind_dn=PAM_DN, password=self.slapd.pam_password, base=self.bases["main"],
                             scope="subtree", filter_ber=ldap_wire.encode_filter("(uid=nobody-there)"),
                             attributes=attributes, size_limit=2)
            times.append(time.perf_counter() - started)
        return round(median_ms(times), 2)

    def redis_setup(self, ws: Workspace, name: str, users: list[str], setups: list[LinkusSetup],
                    lockout: dict[str, int] | None = None) -> LinkusSetup:
        """YAML (1,000 extensions) with state in Redis, for the parallel runs."""
        config: dict[str, Any] = {
            "state": {"backend": "redis", "redis": {"url": self.redis.url, "prefix": f"bench{name}:"}}}
        if lockout:
            config["lockout"] = lockout
        setup = LinkusSetup(ws, name, users, extensions=1000, config=config)
        setups.append(setup)
        setup.warm()
        return setup

    def close(self) -> None:
        if self.slapd is not None:
            self.slapd.stop()
        if self.redis is not None:
            self.redis.stop()


def _entry(base: str, rdn: str, uid: str, entry: dict[str, Any], attributes: dict[str, str]) -> str:
    lines = [f"dn: cn={rdn},{base}", "objectClass: inetOrgPerson", "objectClass: linkusTwoFactorAccount",
             f"cn: {rdn}", f"sn: {rdn}", f"uid: {uid}"]
    for key, value in entry.items():
        lines.append(f"{attributes[key]}: {value}")
    return "\n".join(lines) + "\n"
