"""One pam-linkus login in this process, with a stand-in for pam_python's ``pamh``.

Run as a child of the benchmark or of tests/test_lazy_imports.py::

    /usr/bin/python3 -I [-S] [-X importtime] bench/fakepam.py SPEC

It mirrors what pam_python does in a login process: the loader puts the package
on ``sys.path`` and imports ``pam_linkus.pam_face``, then pam_sm_authenticate runs
once. SPEC (``spec_arg``: a marshalled dict in hex, so that reading it imports
nothing that a login could then hide) names the repository (or installed site directory), argv of the
PAM line, the user, the answers to the prompts, and ``system_site`` (the
directories Debian's site.py would add; -S leaves them out, so a run without
site still finds ``yaml`` for a cold cache).

It prints one JSON line: the PAM code name, the prompts, the modules the login
imported (sys.modules after minus before) and the time the login took.

Why not through libpam: -X importtime and sys.modules are only reachable from
inside the interpreter, and pam_python ignores PYTHON* environment variables
(it sets Py_IgnoreEnvironmentFlag), so PYTHONPROFILEIMPORTTIME has no effect there.
"""

from __future__ import annotations

import sys

_AT_START = set(sys.modules)  # before anything of ours: everything the login adds is counted

import marshal  # noqa: E402 - builtin, already loaded by the interpreter
import time  # noqa: E402 - builtin

_CODES = {
    "PAM_SUCCESS": 0, "PAM_SERVICE_ERR": 3, "PAM_SYSTEM_ERR": 4, "PAM_AUTH_ERR": 7,
    "PAM_AUTHINFO_UNAVAIL": 9, "PAM_USER_UNKNOWN": 10, "PAM_MAXTRIES": 11, "PAM_CONV_ERR": 19,
    "PAM_IGNORE": 25, "PAM_ABORT": 26,
}


class _PamError(Exception):
    def __init__(self, pam_result: int):
        super().__init__(pam_result)
        self.pam_result = pam_result


class _Message:
    def __init__(self, msg_style: int, msg: str):
        self.msg_style = msg_style
        self.msg = msg


class _Response:
    def __init__(self, resp: str | None, ret_code: int = 0):
        self.resp = resp
        self.resp_retcode = ret_code


class FakePamh:
    """The parts of pam_python's PamHandle that pam_linkus uses."""

    PAM_PROMPT_ECHO_OFF = 1
    PAM_PROMPT_ECHO_ON = 2
    PAM_ERROR_MSG = 3
    PAM_TEXT_INFO = 4
    PAM_SILENT = 0x8000
    exception = _PamError
    Message = _Message
    Response = _Response

    def __init__(self, user: str, answers: list[str], service: str = "bench", rhost: str | None = None):
        for name, value in _CODES.items():
            setattr(self, name, value)
        self.user = user
        self.service = service
        self.rhost = rhost
        self.tty = None
        self._answers = list(answers)
        self.prompts: list[str] = []
        self.infos: list[str] = []

    def get_user(self, prompt: str | None = None) -> str:
        return self.user

    def conversation(self, message: _Message) -> _Response:
        if message.msg_style in (self.PAM_PROMPT_ECHO_OFF, self.PAM_PROMPT_ECHO_ON):
            self.prompts.append(message.msg)
            if not self._answers:
                raise _PamError(self.PAM_CONV_ERR)  # type: ignore[attr-defined]
            return _Response(self._answers.pop(0))
        self.infos.append(message.msg)
        return _Response(None)


def spec_arg(spec: dict[str, object]) -> str:
    """The command-line form of ``spec`` for this script."""
    return marshal.dumps(spec).hex()


def main() -> None:
    spec = marshal.loads(bytes.fromhex(sys.argv[1]))
    for extra in spec.get("system_site", []):
        if extra not in sys.path:
            sys.path.append(extra)
    sys.path.insert(0, spec["site"])
    before = _AT_START
    sys.stderr.write("--- login starts ---\n")  # -X importtime lines after this are the login's
    sys.stderr.flush()
    started = time.perf_counter()
    from pam_linkus.pam_face import pam_sm_authenticate

    imported_face = time.perf_counter()
    pamh = FakePamh(spec["user"], spec.get("answers", []), rhost=spec.get("rhost"))
    rc = pam_sm_authenticate(pamh, 0, [spec.get("module", "pam_linkus.py"), *spec.get("argv", [])])
    finished = time.perf_counter()
    imported = sorted(set(sys.modules) - before)
    sys.stderr.write("--- login ends ---\n")
    sys.stderr.flush()
    import json

    names = {v: k for k, v in _CODES.items()}
    print(json.dumps({
        "code": names.get(rc, str(rc)),
        "prompts": pamh.prompts,
        "imported": imported,
        "import_ms": (imported_face - started) * 1000,
        "login_ms": (finished - started) * 1000,
    }))


if __name__ == "__main__":
    main()
