"""Options on the /etc/pam.d line, parsed into a typed structure.

``key=value`` or a bare flag; an unknown option, a flag given a value or a value
option given none is a ConfigError, so a typo refuses logins (and syslog names
it) instead of being silently ignored. Values may hold spaces when the admin
wraps the whole option in brackets (``[prompt=Code from your app:]``), which
libpam removes before we see it.
"""

from __future__ import annotations

from pam_linkus.config import DEFAULT_CONFIG_PATH
from pam_linkus.errors import ConfigError
from pam_linkus.filecache import DEFAULT_CACHE_DIR

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_LOG_SOCKET = "/dev/log"

#: option -> "path" | "text" | "flag"
_KINDS = {
    "config": "path",
    "cache_dir": "path",
    "log_socket": "path",
    "prompt": "text",
    "debug": "flag",
    "echo_code": "flag",
    "forward_pass": "flag",
}


class PamOptions:
    """What the PAM line asked for. ``prompt`` None means: the config's prompt."""

    __slots__ = ("config", "cache_dir", "log_socket", "prompt", "debug", "echo_code", "forward_pass")

    def __init__(
        self,
        config: str = DEFAULT_CONFIG_PATH,
        cache_dir: str = DEFAULT_CACHE_DIR,
        log_socket: str = DEFAULT_LOG_SOCKET,
        prompt: str | None = None,
        debug: bool = False,
        echo_code: bool = False,
        forward_pass: bool = False,
    ):
        self.config = config
        #: root-only directory for the compiled config and extensions index (pam_linkus.filecache)
        self.cache_dir = cache_dir
        self.log_socket = log_socket
        self.prompt = prompt
        self.debug = debug
        self.echo_code = echo_code
        self.forward_pass = forward_pass

    def __repr__(self) -> str:
        return "PamOptions(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def parse_options(argv: Sequence[str]) -> PamOptions:
    """Parse pam_python's argv (argv[0] is the module's own path)."""
    values: dict[str, object] = {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        kind = _KINDS.get(key)
        if kind is None:
            raise ConfigError(f"unknown option {key[:40]!r} on the PAM line")
        if key in values:
            raise ConfigError(f"option {key!r} given twice on the PAM line")
        if kind == "flag":
            if sep:
                raise ConfigError(f"option {key!r} is a flag and takes no value")
            values[key] = True
            continue
        if not sep or not value:
            raise ConfigError(f"option {key!r} needs a value ({key}=...)")
        if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 1024:
            raise ConfigError(f"option {key!r} has control characters or is too long")
        if kind == "path" and not value.startswith("/"):
            raise ConfigError(f"option {key!r} must be an absolute path")
        if kind == "text" and len(value) > 200:
            raise ConfigError(f"option {key!r} is longer than 200 characters")
        values[key] = value
    return PamOptions(**values)  # type: ignore[arg-type]
