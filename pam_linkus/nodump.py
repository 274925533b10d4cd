"""No core dumps of a process that holds secrets.

linkusd holds TOTP secrets, email-code keys, the LDAP/SMTP/Redis passwords and, during a
self-service sign-in, the account's password; linkus-web holds that password on its way to
linkusd. A core file (or a same-uid ptrace, which the same "dumpable" flag governs) would copy
them to disk. systemd units also say LimitCORE=0; this covers the daemon started by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource

#: linux/prctl.h
PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Core size limit 0 (best effort: a unit's seccomp filter may deny setrlimit, LimitCORE=0 then
    holds) and not dumpable (required: raises OSError if the kernel refuses)."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(errno)}")

