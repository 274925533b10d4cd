"""The changes an enrollment makes, shared by ``linkus-2fa`` and the self-service page.

Each function is one change of the extension's settings entry (through
``nss_config.writer``) plus its state record, in the order that fails safely:
the state store is opened before the source is written, so a store that cannot
be reached stops the change before anything is saved. Blocking; linkusd runs
them in a worker. Nothing here logs: callers write the audit line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nss_config.writer import source_of, writer_for
from pam_linkus.recovery import digest, generate_codes, new_salt

if TYPE_CHECKING:
    from nss_config.base import ExtensionSettings
    from pam_linkus.config import Config
    from pam_linkus.state.base import StateStore


def save_totp(config: Config, store: StateStore, ext: str, secret: str, step: int | None, now: float) -> str:
    """Save a confirmed TOTP secret (the email address is kept); record ``step`` as used. Returns the source."""
    source, _current = source_of(config, ext)
    writer = writer_for(config, source)
    writer.preflight(ext)

    def change(old: dict[str, Any] | None) -> dict[str, Any]:
        kept = {k: v for k, v in (old or {}).items() if k == "email"}
        return {**kept, "method": "totp", "secret": secret, "enabled": True}

    writer.update(ext, change)
    store.record_enrollment(ext, "totp", now, totp_step=step)
    return source


def save_email(config: Config, store: StateStore, ext: str, address: str, now: float) -> str:
    """Save email 2FA to a confirmed address; a TOTP secret left behind would be a key nobody uses."""
    source, _current = source_of(config, ext)
    writer = writer_for(config, source)
    writer.preflight(ext)
    writer.update(ext, lambda _old: {"method": "email", "email": address, "enabled": True})
    store.record_enrollment(ext, "email", now)
    return source


def switch_off(config: Config, store: StateStore, ext: str) -> tuple[str, ExtensionSettings | None]:
    """Turn 2FA off and drop the secret (it went with the phone); clear failures, lock, recovery codes.

    Returns the source and the settings before the change (None: no source knows the extension).
    """
    source, current = source_of(config, ext)
    if current is not None:
        def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None:
                return None
            kept = {k: v for k, v in old.items() if k in ("method", "email")}
            return {**kept, "enabled": False}

        writer_for(config, source).update(ext, change)
    store.forget(ext)
    return source, current


def new_recovery_codes(store: StateStore, ext: str, count: int) -> list[str]:
    """Replace the extension's recovery codes; the plain codes exist only in the returned list."""
    codes = generate_codes(count)
    salt = new_salt()
    store.set_recovery_codes(ext, salt, [digest(c, salt) for c in codes])
    return codes

