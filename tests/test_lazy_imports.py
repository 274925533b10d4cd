"""A login imports only what it uses (pam_python pays every import in every login process).

Each login runs in a child /usr/bin/python3 -I -S (no site: on a plain Debian
host site.py imports almost nothing, so -S shows what *our* login adds) with a
stand-in for pam_python's pamh (bench/fakepam.py), and reports the modules it
imported. A warm YAML+SQLite login must import none of the heavy or unused
modules below -- not even ``yaml``, which the compiled caches replace.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SECRET, code_at, write_yaml
from ldap_server import Slapd, ldap_config, write_password
from redis_server import RedisServer

from pam_linkus.warm import warm

FAKEPAM = REPO / "bench" / "fakepam.py"
SYSTEM_SITE = ["/usr/local/lib/python3.11/dist-packages", "/usr/lib/python3/dist-packages"]

#: Never on a YAML+SQLite login with warm caches (top-level module names).
NEVER_WARM = {
    "yaml", "ldap3", "redis", "smtplib", "ssl", "_ssl", "segno", "email", "dataclasses", "typing", "enum",
    "re", "socket", "hashlib", "_hashlib", "hmac", "base64", "json", "secrets", "random", "logging", "sqlite3",
    "datetime",
    "subprocess", "threading", "argparse", "pathlib", "urllib", "inspect", "ctypes", "syslog",
}
#: Never on any YAML+SQLite login, even one that rebuilds the caches.
NEVER = {"ldap3", "redis", "smtplib", "ssl", "_ssl", "segno", "email", "dataclasses", "typing", "socket"}


@pytest.fixture
def files(private_dir: Path) -> dict[str, Any]:
    ext = private_dir / "extensions.yaml"
    config = private_dir / "pam_linkus.yaml"
    (private_dir / "state").mkdir(mode=0o700)
    write_yaml(ext, {"extensions": {"1001": {"method": "totp", "secret": SECRET},
                                    "1002": {"method": "none"}}})
    write_yaml(config, {"sources": ["yaml"], "yaml": {"path": str(ext)},
                        "state": {"path": str(private_dir / "state" / "state.db")}}, 0o600)
    argv = [f"config={config}", f"cache_dir={private_dir / 'cache'}", f"log_socket={private_dir / 'no-log'}"]
    return {"config": config, "cache": private_dir / "cache", "argv": argv}


def fake_login(files: dict[str, Any], user: str, answers: list[str]) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from fakepam import spec_arg

    spec = {"site": str(REPO), "argv": files["argv"], "user": user, "answers": answers, "system_site": SYSTEM_SITE}
    proc = subprocess.run(["/usr/bin/python3", "-I", "-S", str(FAKEPAM), spec_arg(spec)], capture_output=True,
                          text=True, timeout=60, check=False, env={"PATH": os.environ.get("PATH", "/usr/bin")})
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    # The capture works: the login's own modules are listed.
    assert {"pam_linkus.pam_face", "pam_linkus.config"} <= set(result["imported"])
    return result


def top_level(result: dict[str, Any]) -> set[str]:
    return {name.split(".")[0] for name in result["imported"]}


def test_cold_login_imports_yaml_but_nothing_unused(files: dict[str, Any]) -> None:
    result = fake_login(files, "1001", [code_at(SECRET, time.time())])
    assert result["code"] == "PAM_SUCCESS"
    assert "yaml" in top_level(result)  # no caches yet: the YAML was parsed
    assert top_level(result) & NEVER == set()


def test_warm_login_imports_nothing_it_does_not_use(files: dict[str, Any]) -> None:
    warm(str(files["config"]), str(files["cache"]))
    result = fake_login(files, "1001", [code_at(SECRET, time.time())])
    assert result["code"] == "PAM_SUCCESS"
    assert "nss_config.yaml_index" in result["imported"] and "_sqlite3" in result["imported"]
    assert top_level(result) & NEVER_WARM == set()
    wrong = fake_login(files, "1001", ["000000" if code_at(SECRET, time.time()) != "000000" else "111111"])
    assert wrong["code"] == "PAM_AUTH_ERR"
    assert top_level(wrong) & NEVER_WARM == set()


def test_login_without_second_factor_does_not_open_the_state_store(files: dict[str, Any]) -> None:
    warm(str(files["config"]), str(files["cache"]))
    result = fake_login(files, "1002", [])
    assert result["code"] == "PAM_IGNORE" and result["prompts"] == []
    assert top_level(result) & (NEVER_WARM | {"sqlite3", "_sqlite3"}) == set()


#: Never on a Redis login (plain TCP): redis-py alone cost ~100 ms per login; the RESP client
#: uses ``_socket``, so not even ``socket`` (with ``enum``) or the idna codec (with ``re``).
NEVER_REDIS = NEVER_WARM - {"socket"} | {"asyncio", "importlib", "socket", "encodings.idna", "sqlite3", "_sqlite3"}


def test_redis_login_imports_no_redis_package(files: dict[str, Any], redis_server: RedisServer) -> None:
    config = {"sources": ["yaml"], "yaml": {"path": str(files["config"].parent / "extensions.yaml")},
              "state": {"backend": "redis", "redis": {"url": redis_server.url, "prefix": "lazy:"}}}
    write_yaml(files["config"], config, 0o600)
    warm(str(files["config"]), str(files["cache"]))
    code = code_at(SECRET, time.time())
    result = fake_login(files, "1001", [code])
    assert result["code"] == "PAM_SUCCESS"
    assert "pam_linkus.state.resp" in result["imported"] and "pam_linkus.state.redis_store" in result["imported"]
    names = top_level(result) | set(result["imported"])
    assert names & NEVER_REDIS == set()
    again = fake_login(files, "1001", [code])  # the same code again: the store said "replay"
    assert again["code"] == "PAM_AUTH_ERR"
    assert (top_level(again) | set(again["imported"])) & NEVER_REDIS == set()


@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")  # the fixture's ldap3 admin
def test_ldap_login_imports_no_ldap3(files: dict[str, Any], slapd: Slapd, private_dir: Path) -> None:
    """The login path speaks LDAP through nss_config.ldap_wire: importing ldap3
    alone cost about 60 ms of every LDAP login."""
    user = f"lz{os.getpid()}"
    pw = write_password(private_dir / "bind.pw", slapd.pam_password)
    write_yaml(files["config"], {"sources": ["ldap"],
                                 "ldap": ldap_config(slapd, slapd.tree({user: {"method": "totp", "secret": SECRET}}),
                                                     pw),
                                 "state": {"path": str(private_dir / "state" / "state.db")}}, 0o600)
    warm(str(files["config"]), str(files["cache"]))
    result = fake_login(files, user, [code_at(SECRET, time.time())])
    assert result["code"] == "PAM_SUCCESS"
    assert {"nss_config.ldap_wire", "_ssl", "_socket"} <= set(result["imported"])
    # Nor the Python wrappers ssl and socket (enum, selectors, re, base64 ...: about 10 ms).
    assert top_level(result) & {"ldap3", "pyasn1", "ssl", "socket", "enum", "selectors", "re", "base64", "redis",
                                "smtplib", "segno", "email", "yaml", "typing", "dataclasses"} == set()
