"""Run one PAM transaction for a web front end (or a test): ``authenticate``.

A web app that calls libpam through ctypes in its own process crashes once the
stack loads pam_python (pam_python and the app share one interpreter and the GIL
handling collides), and would hold a worker through pam_unix's failure delay.
So ``authenticate`` runs the transaction in a child process -- this same module
run as ``python3 -m pam_linkus.client`` -- answers each prompt by its kind
(password prompt: the password; any other hidden or visible prompt: the code),
and kills the child when the timeout expires.

After PAM_SUCCESS from pam_authenticate the child also runs pam_acct_mgmt, as a
real login would, and reports both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

#: The interpreter that runs the child; pam_python embeds the system Python 3.
CHILD_PYTHON = "/usr/bin/python3"

PAM_CODES = {
    0: "PAM_SUCCESS", 1: "PAM_OPEN_ERR", 2: "PAM_SYMBOL_ERR", 3: "PAM_SERVICE_ERR", 4: "PAM_SYSTEM_ERR",
    5: "PAM_BUF_ERR", 6: "PAM_PERM_DENIED", 7: "PAM_AUTH_ERR", 8: "PAM_CRED_INSUFFICIENT",
    9: "PAM_AUTHINFO_UNAVAIL", 10: "PAM_USER_UNKNOWN", 11: "PAM_MAXTRIES", 12: "PAM_NEW_AUTHTOK_REQD",
    13: "PAM_ACCT_EXPIRED", 14: "PAM_SESSION_ERR", 15: "PAM_CRED_UNAVAIL", 16: "PAM_CRED_EXPIRED",
    17: "PAM_CRED_ERR", 18: "PAM_NO_MODULE_DATA", 19: "PAM_CONV_ERR", 20: "PAM_AUTHTOK_ERR",
    25: "PAM_IGNORE", 26: "PAM_ABORT",
}


class ClientResult:
    """How the transaction ended: ``auth`` and ``account`` are PAM code names
    (``account`` is None when authentication failed), ``prompts`` what PAM asked,
    ``messages`` what it told the user."""

    __slots__ = ("auth", "account", "prompts", "messages")

    def __init__(self, auth: str, account: str | None, prompts: list[str], messages: list[str]):
        self.auth = auth
        self.account = account
        self.prompts = prompts
        self.messages = messages

    @property
    def ok(self) -> bool:
        return self.auth == "PAM_SUCCESS" and self.account == "PAM_SUCCESS"

    def __repr__(self) -> str:
        return f"ClientResult(auth={self.auth}, account={self.account}, prompts={self.prompts!r})"


class ClientError(Exception):
    """The child could not run the transaction (timeout, crash)."""


def authenticate(
    service: str,
    user: str,
    password: str | None,
    code: str | None,
    rhost: str | None = None,
    *,
    timeout: float = 30.0,
    tty: str | None = None,
) -> ClientResult:
    """Run pam_authenticate (+ pam_acct_mgmt on success) for ``user`` in a child process."""
    request = {"service": service, "user": user, "password": password, "code": code, "rhost": rhost, "tty": tty}
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here
    try:
        proc = subprocess.run(
            [CHILD_PYTHON, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
             "from pam_linkus.client import _child_main; _child_main()", here],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ClientError(f"PAM transaction did not finish within {timeout} s") from None
    if proc.returncode != 0:
        raise ClientError(f"PAM child exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    data = json.loads(proc.stdout)
    return ClientResult(data["auth"], data["account"], data["prompts"], data["messages"])


def _child_main() -> None:
    """In the child: run the transaction with libpam through ctypes, print JSON."""
    import ctypes
    import ctypes.util

    request: dict[str, Any] = json.loads(sys.stdin.buffer.read())
    # PyDLL keeps the GIL across libpam calls: pam_python, loaded by libpam into
    # this same interpreter, must find it held.
    libpam = ctypes.PyDLL(ctypes.util.find_library("pam") or "libpam.so.0")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]

    class PamMessage(ctypes.Structure):
        _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]

    class PamResponse(ctypes.Structure):
        _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]

    conv_func = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(PamMessage)),
        ctypes.POINTER(ctypes.POINTER(PamResponse)), ctypes.c_void_p,
    )

    class PamConv(ctypes.Structure):
        _fields_ = [("conv", conv_func), ("appdata_ptr", ctypes.c_void_p)]

    prompts: list[str] = []
    messages: list[str] = []
    PROMPT_ECHO_OFF, PROMPT_ECHO_ON = 1, 2

    def answer(text: str) -> str | None:
        if "password" in text.lower() and request["password"] is not None:
            return str(request["password"])
        code: str | None = request["code"]
        return code

    def conversation(n: int, msgs: Any, resp: Any, _appdata: Any) -> int:
        block = libc.calloc(n, ctypes.sizeof(PamResponse))
        if not block:
            return 5  # PAM_BUF_ERR
        responses = ctypes.cast(block, ctypes.POINTER(PamResponse))
        for i in range(n):
            style = msgs[i].contents.msg_style
            text = (msgs[i].contents.msg or b"").decode(errors="replace")
            if style in (PROMPT_ECHO_OFF, PROMPT_ECHO_ON):
                prompts.append(text)
                reply = answer(text)
                if reply is None:
                    return 19  # PAM_CONV_ERR: this client has no answer (libpam frees nothing yet)
                responses[i].resp = libc.strdup(reply.encode())
            else:
                messages.append(text)
        resp[0] = responses
        return 0

    conv = PamConv(conv_func(conversation), None)
    handle = ctypes.c_void_p()
    libpam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(PamConv),
                                 ctypes.POINTER(ctypes.c_void_p)]
    libpam.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    libpam.pam_authenticate.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_acct_mgmt.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
    rc = libpam.pam_start(request["service"].encode(), request["user"].encode(), ctypes.byref(conv),
                          ctypes.byref(handle))
    if rc != 0:
        print(json.dumps({"auth": PAM_CODES.get(rc, str(rc)), "account": None, "prompts": [], "messages": []}))
        return
    PAM_TTY, PAM_RHOST = 3, 4
    keep = []
    for item, value in ((PAM_RHOST, request.get("rhost")), (PAM_TTY, request.get("tty"))):
        if value:
            buf = ctypes.c_char_p(value.encode())
            keep.append(buf)
            libpam.pam_set_item(handle, item, ctypes.cast(buf, ctypes.c_void_p))
    rc = libpam.pam_authenticate(handle, 0)
    account = None
    if rc == 0:
        account = PAM_CODES.get(libpam.pam_acct_mgmt(handle, 0), "?")
    libpam.pam_end(handle, rc)
    print(json.dumps({"auth": PAM_CODES.get(rc, str(rc)), "account": account, "prompts": prompts,
                      "messages": messages}))


if __name__ == "__main__":
    _child_main()
