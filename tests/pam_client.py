"""The tests' PAM client: one PAM transaction in a child process, ``authenticate``.

A child process, so a test can kill a transaction that hangs and a crash in
libpam or a module shows as the child's exit status. ``authenticate`` runs the
transaction in a child -- this same module -- answers each prompt by its kind
(password prompt: the password; any other hidden or visible prompt: the code),
and kills the child when the timeout expires.

After PAM_SUCCESS from pam_authenticate the child also runs pam_acct_mgmt, as a
real login would, and reports both; ``ClientResult.outcome`` turns them into the
one thing the app needs to know (ClientOutcome). ``PamClient`` bounds how many
transactions a threaded app runs at once. Single-field mode (the stack runs
pam_linkus with ``forward_pass``) sends password and code as one answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

#: The interpreter that runs the child.
CHILD_PYTHON = "/usr/bin/python3"

PAM_CODES = {
    0: "PAM_SUCCESS", 1: "PAM_OPEN_ERR", 2: "PAM_SYMBOL_ERR", 3: "PAM_SERVICE_ERR", 4: "PAM_SYSTEM_ERR",
    5: "PAM_BUF_ERR", 6: "PAM_PERM_DENIED", 7: "PAM_AUTH_ERR", 8: "PAM_CRED_INSUFFICIENT",
    9: "PAM_AUTHINFO_UNAVAIL", 10: "PAM_USER_UNKNOWN", 11: "PAM_MAXTRIES", 12: "PAM_NEW_AUTHTOK_REQD",
    13: "PAM_ACCT_EXPIRED", 14: "PAM_SESSION_ERR", 15: "PAM_CRED_UNAVAIL", 16: "PAM_CRED_EXPIRED",
    17: "PAM_CRED_ERR", 18: "PAM_NO_MODULE_DATA", 19: "PAM_CONV_ERR", 20: "PAM_AUTHTOK_ERR",
    25: "PAM_IGNORE", 26: "PAM_ABORT",
}


class ClientOutcome:
    """What the web app should do with a ClientResult (``ClientResult.outcome``)."""

    SUCCESS = "success"                  # authenticated and the account may log in now
    NEED_CODE = "need_code"              # password right, a code is needed: ask for it, then call again
    DENIED = "denied"                    # wrong password or code, unknown user, replayed code
    LOCKED = "locked"                    # too many failures: only an admin (or the lock's expiry) helps
    ACCOUNT_REFUSED = "account_refused"  # authenticated, but pam_acct_mgmt said no (expired, not allowed)
    UNAVAILABLE = "unavailable"          # the PAM stack could not decide (config, directory, state store)


_UNAVAILABLE_CODES = frozenset({
    "PAM_OPEN_ERR", "PAM_SYMBOL_ERR", "PAM_SERVICE_ERR", "PAM_SYSTEM_ERR", "PAM_BUF_ERR",
    "PAM_AUTHINFO_UNAVAIL", "PAM_ABORT",
})


class ClientResult:
    """How the transaction ended: ``auth`` and ``account`` are PAM code names
    (``account`` is None when authentication failed), ``prompts`` what PAM asked,
    ``messages`` what it told the user, ``unanswered`` the prompt this client had
    no answer for (None if every prompt was answered)."""

    __slots__ = ("auth", "account", "prompts", "messages", "unanswered")

    def __init__(self, auth: str, account: str | None, prompts: list[str], messages: list[str],
                 unanswered: str | None = None):
        self.auth = auth
        self.account = account
        self.prompts = prompts
        self.messages = messages
        self.unanswered = unanswered

    @property
    def ok(self) -> bool:
        """Only both PAM_SUCCESS lets the user in: authenticated AND account allowed."""
        return self.auth == "PAM_SUCCESS" and self.account == "PAM_SUCCESS"

    @property
    def outcome(self) -> str:
        """One ClientOutcome value; anything not recognised is DENIED (fail closed)."""
        if self.auth == "PAM_SUCCESS":
            return ClientOutcome.SUCCESS if self.account == "PAM_SUCCESS" else ClientOutcome.ACCOUNT_REFUSED
        if self.auth == "PAM_CONV_ERR" and self.unanswered is not None and not _is_password_prompt(self.unanswered):
            return ClientOutcome.NEED_CODE
        if self.auth == "PAM_MAXTRIES":
            return ClientOutcome.LOCKED
        if self.auth in _UNAVAILABLE_CODES:
            return ClientOutcome.UNAVAILABLE
        return ClientOutcome.DENIED

    def __repr__(self) -> str:
        return (f"ClientResult(auth={self.auth}, account={self.account}, outcome={self.outcome}, "
                f"prompts={self.prompts!r})")


class ClientError(Exception):
    """The child could not run the transaction (crash, bad input); treat as unavailable."""


class ClientTimeout(ClientError):
    """The transaction did not finish in time; the child (and its process group) was killed."""


class ClientBusy(ClientError):
    """PamClient: no free slot for another PAM transaction within the timeout."""


def _is_password_prompt(text: str) -> bool:
    return "password" in text.lower()


def authenticate(
    service: str,
    user: str,
    password: str | None,
    code: str | None,
    rhost: str | None = None,
    *,
    timeout: float = 30.0,
    tty: str | None = None,
    single_field: bool = False,
) -> ClientResult:
    """Run pam_authenticate (+ pam_acct_mgmt on success) for ``user`` in a child process.

    Two-step (default): a prompt that mentions "password" gets ``password``, any
    other prompt gets ``code``; ``code=None`` and a code prompt end in
    ClientOutcome.NEED_CODE, so an app can ask for the code only when needed.
    ``single_field``: every prompt gets password + code in one answer (the stack
    runs pam_linkus with ``forward_pass``); ``code=None`` sends the password alone.

    ``rhost`` must be the client's IP address as the app saw it (never a
    header the client can set unless a trusted proxy set it): exempt networks and
    grace periods key on it. Raises ClientTimeout after ``timeout`` seconds (the
    child is killed), ClientError if the child failed, ValueError for a NUL byte.
    """
    if single_field:
        password = (password or "") + "".join((code or "").split())
        code = None
    request = {"service": service, "user": user, "password": password, "code": code, "rhost": rhost, "tty": tty,
               "single_field": single_field}
    for key, value in request.items():
        if isinstance(value, str) and "\0" in value:
            raise ValueError(f"{key} contains a NUL byte")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    here = os.path.dirname(os.path.abspath(__file__))
    # A session of its own, so a timeout kills helpers the stack started (unix_chkpwd) too.
    proc = subprocess.Popen(
        [CHILD_PYTHON, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from pam_client import _child_main; _child_main()", here],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, start_new_session=True,
    )
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.communicate()
        raise ClientTimeout(f"PAM transaction did not finish within {timeout} s") from None
    except BaseException:
        _kill_tree(proc.pid)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise ClientError(f"PAM child exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    try:
        data = json.loads(out.splitlines()[-1])
        return ClientResult(data["auth"], data["account"], data["prompts"], data["messages"], data["unanswered"])
    except (ValueError, IndexError, KeyError, TypeError):
        raise ClientError("PAM child gave no result") from None


def _kill_tree(root: int) -> None:
    """SIGKILL the PAM child and everything it started.

    Killing the process group is not enough: helpers such as pam_exec call
    setsid(). So the tree is first frozen with SIGSTOP, level by level (a stopped
    process neither forks nor exits, so no one is re-parented to init meanwhile),
    then killed.
    """
    import signal

    frozen: set[int] = set()
    level = {root}
    for _ in range(16):  # bounded: each round freezes one more generation
        for pid in level:
            _signal(pid, signal.SIGSTOP)
        frozen |= level
        level = _children_of(frozen) - frozen
        if not level:
            break
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    try:
        os.killpg(root, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _children_of(parents: set[int]) -> set[int]:
    """PIDs whose parent is in ``parents`` (from /proc/<pid>/stat)."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()  # the name in parentheses may hold spaces
        if len(fields) > 1 and int(fields[1]) in parents:
            children.add(int(entry))
    return children


class PamClient:
    """``authenticate`` for a threaded web app: one PAM service, a bound on how many
    PAM transactions (child processes) run at once, how long a request may wait for
    one (``wait``, default ``timeout``) and how long one may run (``timeout``), so a
    burst of logins cannot fork without limit."""

    def __init__(self, service: str, *, max_concurrent: int = 4, timeout: float = 30.0,
                 wait: float | None = None, single_field: bool = False):
        import threading

        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.service = service
        self.timeout = timeout
        self.wait = timeout if wait is None else wait
        self.single_field = single_field
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def authenticate(self, user: str, password: str, code: str | None = None,
                     rhost: str | None = None) -> ClientResult:
        """See ``authenticate``; raises ClientBusy when no slot frees up within ``wait``."""
        if not self._slots.acquire(timeout=self.wait):
            raise ClientBusy(f"no free PAM slot within {self.wait} s")
        try:
            return authenticate(self.service, user, password, code, rhost, timeout=self.timeout,
                                single_field=self.single_field)
        finally:
            self._slots.release()


def run_transaction(
    service: str,
    user: str,
    answer: Callable[[str], str | None],
    *,
    rhost: str | None = None,
    tty: str | None = None,
    on_message: Callable[[str], None] | None = None,
) -> tuple[str, str | None]:
    """Run pam_authenticate (+ pam_acct_mgmt on success) through libpam in THIS process.

    Only for a process of its own (the child of ``authenticate``, a test's
    conversation child). ``answer(prompt)`` gives each reply (None: hang up,
    PAM_CONV_ERR); informational lines go to ``on_message``. Returns the code
    names of authentication and account management (None when not reached).
    """
    import ctypes
    import ctypes.util
    import gc

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

    prompt_echo_off, prompt_echo_on = 1, 2

    def conversation(n: int, msgs: Any, resp: Any, _appdata: Any) -> int:
        block = libc.calloc(n, ctypes.sizeof(PamResponse))
        if not block:
            return 5  # PAM_BUF_ERR
        responses = ctypes.cast(block, ctypes.POINTER(PamResponse))
        for i in range(n):
            style = msgs[i].contents.msg_style
            text = (msgs[i].contents.msg or b"").decode(errors="replace")
            if style in (prompt_echo_off, prompt_echo_on):
                reply = answer(text)
                if reply is None:
                    return 19  # PAM_CONV_ERR: no answer (libpam frees nothing yet)
                responses[i].resp = libc.strdup(reply.encode())
            elif on_message is not None:
                on_message(text)
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
    rc = libpam.pam_start(service.encode(), user.encode(), ctypes.byref(conv), ctypes.byref(handle))
    if rc != 0:
        return PAM_CODES.get(rc, str(rc)), None
    pam_tty, pam_rhost = 3, 4
    keep = []
    for item, value in ((pam_rhost, rhost), (pam_tty, tty)):
        if value:
            buf = ctypes.c_char_p(value.encode())
            keep.append(buf)
            libpam.pam_set_item(handle, item, ctypes.cast(buf, ctypes.c_void_p))
    rc = libpam.pam_authenticate(handle, 0)
    account = PAM_CODES.get(libpam.pam_acct_mgmt(handle, 0), "?") if rc == 0 else None
    libpam.pam_end(handle, rc)
    gc.collect()  # anything left of the conversation must not outlive pam_end badly
    return PAM_CODES.get(rc, str(rc)), account


def _child_main() -> None:
    """In the child: one transaction for ``authenticate``, answers by prompt kind, JSON out."""
    request: dict[str, Any] = json.loads(sys.stdin.buffer.read())
    prompts: list[str] = []
    messages: list[str] = []
    unanswered: list[str] = []

    def answer(text: str) -> str | None:
        prompts.append(text)
        reply: str | None
        if request.get("single_field") or ("password" in text.lower() and request["password"] is not None):
            reply = request["password"]
        else:
            reply = request["code"]
        if reply is None:
            unanswered.append(text)
        return reply

    auth, account = run_transaction(request["service"], request["user"], answer, rhost=request.get("rhost"),
                                    tty=request.get("tty"), on_message=messages.append)
    print(json.dumps({"auth": auth, "account": account, "prompts": prompts, "messages": messages,
                      "unanswered": unanswered[0] if unanswered else None}))


if __name__ == "__main__":
    _child_main()
