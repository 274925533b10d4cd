"""One syslog line per authentication attempt, facility authpriv.

We write RFC 3164 datagrams to the syslog socket ourselves instead of calling
``syslog.openlog``: openlog would change the ident and facility of the host
program (sshd, login, a web server) for the rest of its life. The socket path is
a PAM option so tests can read the lines.

Every value is passed through ``_field``: a user name comes from the client and
could carry newlines or quotes to forge log lines. Codes, secrets and passwords
are never handed to this module.
"""

from __future__ import annotations

import os
import time

LOG_AUTHPRIV = 10 << 3
LOG_ALERT, LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 1, 3, 4, 5, 6, 7
IDENT = "pam_linkus"


def _field(value: object) -> str:
    text = str(value)
    if len(text) > 200:
        text = text[:200] + "..."
    safe = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\x{ord(c):02x}" for c in text)
    if not safe or " " in safe or "=" in safe:
        return f'"{safe}"'
    return safe


def format_fields(fields: dict[str, object]) -> str:
    """``key=value`` pairs, values escaped and quoted where needed."""
    return " ".join(f"{k}={_field(v)}" for k, v in fields.items())


class SyslogSink:
    """Sends lines to a syslog datagram socket; never raises (logging must not
    change a login's outcome), and falls back to stderr only when told to."""

    def __init__(self, socket_path: str = "/dev/log", *, tag: str | None = None):
        self.socket_path = socket_path
        self.tag = tag

    def send(self, severity: int, message: str) -> None:
        # ``_socket`` (the C module) rather than ``socket``: the Python wrapper
        # imports enum, selectors and more -- milliseconds in every login process
        # -- for nothing a single datagram needs.
        import _socket

        stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
        ident = f"{IDENT}({self.tag})" if self.tag else IDENT
        datagram = f"<{LOG_AUTHPRIV | severity}>{stamp} {ident}[{os.getpid()}]: {message}"
        try:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        except OSError:
            return
        try:
            sock.settimeout(1.0)
            sock.sendto(datagram.encode("utf-8", "replace")[:8192], self.socket_path)
        except OSError:
            pass  # no syslog daemon: nothing we can do without changing the outcome
        finally:
            sock.close()

    def attempt(self, severity: int, fields: dict[str, object]) -> None:
        self.send(severity, format_fields(fields))
