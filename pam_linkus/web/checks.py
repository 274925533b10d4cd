"""What ``linkus-2fa doctor`` checks for the self-service page (docs/web.md).

Kept next to the page so the rules it checks (the PAM service holds password
modules only; the web group reaches linkusd's web socket and nothing else)
live in one place. Returns doctor's Findings; never raises.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import TYPE_CHECKING

from pam_linkus.doctor import Finding
from pam_linkus.web.password import PAM_DIR, ServiceRefused, check_service

if TYPE_CHECKING:
    from pam_linkus.config import Config


def check_web(config: Config, pam_dir: str = PAM_DIR) -> list[Finding]:
    findings = []
    name = config.daemon.web_group
    try:
        group: grp.struct_group | None = grp.getgrnam(name)
    except KeyError:
        group = None
    service = config.self_service.pam_service
    try:
        check_service(service, pam_dir)
        findings.append(Finding("ok", "self-service PAM service", f"{service} (password modules only)"))
    except ServiceRefused as exc:
        # absent: password checks are refused (fail closed), nothing is exposed; loading pam_linkus is wrong
        absent = not os.path.exists(os.path.join(pam_dir, service))
        level = "WARN" if absent else "FAIL"
        findings.append(Finding(level, "self-service PAM service",
                                f"{exc}; the web page and `linkus-2fa self` cannot check passwords"))
    if group is None:
        findings.append(Finding("ok", "web group", f"{name} does not exist: the web page is not installed, "
                                                   "linkusd's web socket serves root only"))
        return findings
    members = set(group.gr_mem) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == group.gr_gid}
    privileged = sorted(m for m in members if _uid(m) == 0)
    if privileged:
        findings.append(Finding("FAIL", "web group", f"{name} has root accounts as members ({', '.join(privileged)})"
                                                     ": linkus-web must run unprivileged"))
    elif len(members) > 1:
        findings.append(Finding("WARN", "web group", f"{name} has several members ({', '.join(sorted(members))}): "
                                                     "each of them may call linkusd's web socket; keep only "
                                                     "linkus-web (never the reverse proxy's user)"))
    else:
        findings.append(Finding("ok", "web group", f"{name}: {', '.join(sorted(members)) or 'no members'}"))
    return findings


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None
