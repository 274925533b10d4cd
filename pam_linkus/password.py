"""The account password of a web user, checked through a PAM service that holds password modules only.

Why PAM (and not reading /etc/shadow ourselves): the PBX's accounts may live in
LDAP, sssd or winbind; the admin's PAM service already knows how to check them.
Why our own small ctypes client (libpam is part of every Debian system) and not a
helper process: linkusd runs it in a worker thread of the web pool, and sets
PAM_FAIL_DELAY to a no-op so pam_unix's failure delay does not hold that worker --
SelfService waits with ``asyncio.sleep`` instead.

Used by linkusd for the self-service page (pam_linkus.daemon.selfservice) and by
``linkus-2fa self``; doctor runs ``check_service``.

The service must not load pam_linkus (nor pam_python): the code is asked by the
flow itself, and a service that called back into linkusd would deadlock or count
a code twice. ``check_service`` follows include/substack/@include lines, read by
``pam_linkus.pamconf`` exactly as libpam reads them (``AUTH include inner`` and
``auth<TAB>INCLUDE inner`` pull ``inner`` in as well).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from typing import Any

from pam_linkus.pamconf import logical_lines, parse_rules

PAM_DIR = "/etc/pam.d"
PAM_SUCCESS = 0
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
PAM_FAIL_DELAY = 10
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
_FORBIDDEN = re.compile(r"pam_linkus|pam_python")
_MAX_DEPTH = 8


class ServiceRefused(Exception):
    """The configured PAM service is missing or loads pam_linkus."""


def check_service(service: str, pam_dir: str = PAM_DIR) -> None:
    """Refuse a service that is absent (libpam would fall back to ``other``) or loads pam_linkus."""
    _check_file(service, pam_dir, 0, set())


def _check_file(name: str, pam_dir: str, depth: int, seen: set[str]) -> None:
    if "/" in name or name in ("", ".", "..") or depth > _MAX_DEPTH:
        raise ServiceRefused(f"PAM service {name!r:.60} is not a plain service name")
    if name in seen:
        return
    seen.add(name)
    path = os.path.join(pam_dir, name)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 20)
    except OSError as exc:
        raise ServiceRefused(f"PAM service {name!r:.60}: {exc.strerror}") from None
    # Any mention outside a comment refuses, even on a line libpam would skip as invalid: the
    # check errs towards refusing, never towards a service that calls back into linkusd.
    if any(_FORBIDDEN.search(line) for _first, _last, line in logical_lines(text)):
        raise ServiceRefused(f"PAM service {name!r:.60} loads pam_linkus or pam_python; "
                             "self_service.pam_service must hold password modules only")
    for rule in parse_rules(text):
        if rule.include is not None:
            _check_file(rule.include, pam_dir, depth + 1, seen)
        elif rule.control in ("include", "substack"):
            _check_file(rule.module, pam_dir, depth + 1, seen)


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_CONV_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Message)),
                              ctypes.POINTER(ctypes.POINTER(_Response)), ctypes.c_void_p)
_DELAY_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    libpam = ctypes.CDLL(ctypes.util.find_library("pam") or "libpam.so.0", use_errno=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    libpam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Conv),
                                 ctypes.POINTER(ctypes.c_void_p)]
    libpam.pam_authenticate.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_acct_mgmt.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    return libpam, libc


def check_password(service: str, user: str, password: str, pam_dir: str = PAM_DIR) -> bool:
    """True when ``service`` authenticates ``user`` with ``password`` and its account stack agrees.

    Blocking (libpam may ask LDAP): run it in a worker. Every prompt of the
    service gets the password (password modules ask once); info lines are
    ignored. Raises ServiceRefused for a service we must not use.
    """
    check_service(service, pam_dir)
    libpam, libc = _libs()
    secret = password.encode("utf-8")

    def converse(count: int, messages: Any, responses: Any, _data: int) -> int:
        array = libc.calloc(count, ctypes.sizeof(_Response))
        if not array:
            return 5  # PAM_BUF_ERR
        replies = ctypes.cast(array, ctypes.POINTER(_Response))
        for i in range(count):
            if messages[i].contents.msg_style in (PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON):
                replies[i].resp = libc.strdup(secret)
        responses[0] = replies
        return PAM_SUCCESS

    def no_delay(_retval: int, _usec: int, _data: int) -> None:
        return None

    conv_cb = _CONV_FUNC(converse)
    delay_cb = _DELAY_FUNC(no_delay)
    conv = _Conv(conv_cb, None)
    handle = ctypes.c_void_p()
    rc = libpam.pam_start(service.encode(), user.encode("utf-8"), ctypes.byref(conv), ctypes.byref(handle))
    if rc != PAM_SUCCESS:
        return False
    try:
        libpam.pam_set_item(handle, PAM_FAIL_DELAY, ctypes.cast(delay_cb, ctypes.c_void_p))
        rc = libpam.pam_authenticate(handle, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
        if rc == PAM_SUCCESS:
            rc = libpam.pam_acct_mgmt(handle, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
        return bool(rc == PAM_SUCCESS)
    finally:
        libpam.pam_end(handle, rc)
