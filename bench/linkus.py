"""pam-linkus set-ups for the benchmark: config, extensions, state, cache and the PAM line."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from harness import REPO, SECRET, Workspace

#: Extensions that are not the bench users: a realistic mix of methods.
_FILLER = ("totp", "email", "none")


def extensions_yaml(users: list[str], total: int, secret: str = SECRET) -> str:
    """extensions.yaml text with ``users`` enrolled (TOTP) and filler up to ``total`` entries."""
    lines = ["extensions:"]
    for user in users:
        lines.append(f'  "{user}": {{method: totp, secret: {secret}}}')
    for i in range(max(0, total - len(users))):
        kind = _FILLER[i % 3]
        name = f"{100000 + i}"
        if kind == "totp":
            lines.append(f'  "{name}": {{method: totp, secret: {secret}}}')
        elif kind == "email":
            lines.append(f'  "{name}": {{method: email, email: ext{name}@pbx.example}}')
        else:
            lines.append(f'  "{name}": {{method: none}}')
    return "\n".join(lines) + "\n"


class LinkusSetup:
    """One pam-linkus configuration: its own directory, config, extensions, state and cache."""

    def __init__(self, ws: Workspace, name: str, users: list[str], *, extensions: int = 10,
                 site: Path = REPO, config: dict[str, Any] | None = None):
        self.ws = ws
        self.name = name
        self.users = users
        self.dir = ws.root / f"setup-{name}"
        self.dir.mkdir(mode=0o700)
        self.config_path = self.dir / "pam_linkus.yaml"
        self.extensions_path = self.dir / "extensions.yaml"
        self.state_path = self.dir / "state" / "state.db"
        self.state_path.parent.mkdir(mode=0o700)
        self.cache_dir = self.dir / "cache"
        self.loader = self.dir / "pam_linkus_loader.py"
        self.loader.write_text((REPO / "packaging" / "pam_linkus.py").read_text().replace("@SITE@", str(site)))
        base: dict[str, Any] = {
            "sources": ["yaml"],
            "yaml": {"path": str(self.extensions_path)},
            "state": {"path": str(self.state_path)},
            "lockout": {"max_failures": 100, "permanent_after": 100, "duration": 900},
        }
        base.update(config or {})
        self.config = base
        self.write_config()
        self.extensions_path.write_text(extensions_yaml(users, extensions))
        os.chmod(self.extensions_path, 0o600)
        self.service = ws.service(name, self.auth_lines())
        self._store: Any = None

    def write_config(self) -> None:
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        os.chmod(self.config_path, 0o600)

    def module_args(self) -> list[str]:
        return [f"config={self.config_path}", f"cache_dir={self.cache_dir}", f"log_socket={self.ws.log.path}"]

    def auth_lines(self, *, unix: bool = True) -> str:
        return (("auth requisite pam_unix.so nodelay\n" if unix else "")
                + f"auth [success=ok ignore=ignore default=die] pam_python.so {self.loader} "
                + " ".join(self.module_args()) + "\n"
                "auth required pam_permit.so\n")

    def service_alone(self) -> str:
        """A second PAM service with pam-linkus alone (no password): the module's own cost, less noise."""
        return self.ws.service(f"{self.name}-alone", self.auth_lines(unix=False))

    def warm(self) -> float:
        """Build the compiled config and index (waits until the files are settled); build seconds."""
        from pam_linkus.filecache import RACY_NS

        newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns)
                      for p in (self.config_path, self.extensions_path))
        wait = (newest + RACY_NS - time.time_ns()) / 1e9
        if wait > 0:
            time.sleep(wait + 0.05)
        from pam_linkus.warm import warm

        started = time.perf_counter()
        lines = warm(str(self.config_path), str(self.cache_dir))
        elapsed = time.perf_counter() - started
        if not any("indexed" in line and "NOT" not in line for line in lines) and "yaml" in self.config["sources"]:
            raise RuntimeError(f"{self.name}: index not built: {lines}")
        return elapsed

    def drop_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def new_store(self) -> Any:
        """A store of this set-up's state (one per thread)."""
        from pam_linkus.config import load_config
        from pam_linkus.state import open_store

        return open_store(load_config(str(self.config_path)).state)

    def store(self) -> Any:
        if self._store is None:
            self._store = self.new_store()
        return self._store

    def forget(self, user: str) -> None:
        """Clear replay and failure records (untimed, between logins)."""
        self.store().forget(user)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
