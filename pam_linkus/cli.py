"""``linkus-2fa``: the sysadmin's command, over the same config, sources and state as the module.

``main(argv) -> int``; errors print one line to stderr and exit non-zero. Verbs
reuse pam_linkus/nss_config code: there is no second implementation of anything.
TOTP codes are checked by ``totp.match_totp``, a user's current code by
``flow.authenticate`` (the login decision itself, with lockout and replay),
email codes by ``emailcode``, source writes go through ``nss_config.writer``.

The Yeastar flow this follows: an extension turns 2FA on, adds the account to an
authenticator app (QR code, or the key typed in: "Can't scan"), proves it works
with a current code, and only then is it saved ("Edited successfully."). Every
change leaves one audit line in syslog (who, which extension, what -- never a
secret or code).

``linkus-2fa self ...`` is the self-service entry, run through sudo: the
extension is always the invoking user (SUDO_USER), who first re-enters their
account password (checked through PAM) and, when already enrolled, a current code.
"""

from __future__ import annotations

import argparse
import getpass
import os
import pwd
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from nss_config.base import MIN_SECRET_BITS, ExtensionSettings, check_user_name
from nss_config.chain import build_chain
from nss_config.writer import source_of, writer_for
from nss_config.yaml_source import read_extensions
from pam_linkus import emailcode, enrollment, migrate_pam, notify
from pam_linkus.config import DEFAULT_CONFIG_PATH, Config, load_config
from pam_linkus.doctor import run as run_doctor
from pam_linkus.errors import CodeRejected, ConfigError, ConversationFailed, Denied, LinkusError, NotEnrolled
from pam_linkus.flow import Context, LoginRequest
from pam_linkus.flow import authenticate as decide
from pam_linkus.gauth import read_file
from pam_linkus.logline import LOG_NOTICE, SyslogSink, format_fields
from pam_linkus.mail import SmtpMailer
from pam_linkus.mailtext import check_address, mask_address
from pam_linkus.outcome import Outcome
from pam_linkus.password import ServiceRefused, check_password
from pam_linkus.protocol import Msg, ProtocolError, call_control
from pam_linkus.recovery import digest, display, generate_codes, new_salt, normalize_recovery_code
from pam_linkus.state import open_store
from pam_linkus.state.base import FOREVER, StateStore
from pam_linkus.totp import decode_secret, generate_secret, match_totp, provisioning_uri

#: Tries a person gets to type the confirmation code of a new enrollment.
CONFIRM_TRIES = 3
SAVED = "Edited successfully."


class TerminalPrompter:
    """The flow's Prompter on the terminal: hidden input for passwords, visible for codes."""

    def ask(self, prompt: str, *, echo: bool = False) -> str:
        try:
            if echo:
                return input(prompt)
            return getpass.getpass(prompt)
        except EOFError:
            raise ConversationFailed("no answer") from None

    def info(self, text: str) -> None:
        print(text, flush=True)


class Admin:
    """One run of the command: config, store, audit log, and who is acting."""

    def __init__(self, args: argparse.Namespace, *, actor: str, via: str):
        self.config: Config = load_config(args.config)
        self.sink = SyslogSink(args.log_socket, tag="linkus-2fa")
        self.actor = actor
        self.via = via
        self.prompter = TerminalPrompter()
        self._store: StateStore | None = None

    def store(self) -> StateStore:
        if self._store is None:
            self._store = open_store(self.config.state)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def audit(self, action: str, ext: str, **fields: object) -> None:
        """One syslog line per change; callers never pass a secret or a code."""
        line = format_fields({"action": action, "ext": ext, "by": self.actor, "via": self.via, **fields})
        if not self.sink.send(LOG_NOTICE, line):
            # The change is made; its audit trail must not vanish without a word.
            print(f"linkus-2fa: warning: syslog ({self.sink.socket_path}) did not take the audit line: {line}",
                  file=sys.stderr, flush=True)

    def reload_daemon(self) -> None:
        """Have linkusd load the changed settings now, so the next login sees them.

        Called only after a settings source was written (enroll, disable, import):
        a reload rebuilds the whole snapshot (~2 s of CPU with 100,000 extensions),
        while state changes (unlock, recovery codes, failures) live in the state
        store that every login reads anyway (issue 17.13). Its watcher would notice
        a file edit within a second; asking makes the change take effect before
        this command returns. linkusd not running is said, not fatal: the change
        is saved either way.
        """
        path = self.config.daemon.pam_socket
        try:
            status = call_control(path, Msg.RELOAD, timeout=30)
        except (OSError, ProtocolError) as exc:
            print(f"linkus-2fa: note: linkusd did not answer on {path} ({type(exc).__name__}); it loads the "
                  "change when it starts", file=sys.stderr, flush=True)
            return
        if status.get("last_error"):
            print(f"linkus-2fa: warning: linkusd did not load the new settings: {status['last_error']}",
                  file=sys.stderr, flush=True)

    def notify(self, kind: str, ext: str, address: str | None, *, method: str | None = None,
               previous: bool = False) -> None:
        """Mail the owner's address on file about this change (pam_linkus.notify), right away: one
        command, one mail. A mail that cannot be sent is said and logged; the change stands."""
        if not address or not self.config.notify.enabled:
            return
        by = "you, with linkus-2fa self" if self.via == "self" else f"the administrator ({self.actor})"
        event = notify.Event(kind, ext, time.time(), by=by, method=method, previous=previous)
        try:
            notify.send_now(self.config, SmtpMailer(self.config.smtp), event, address)
        except LinkusError as exc:
            print(f"(the note to {ext}'s address could not be sent: {exc.reason})", file=sys.stderr)
            self.audit("notify", ext, kind=kind, result="failed", reason=exc.reason)
            return
        self.audit("notify", ext, kind=kind, result="sent", address=mask_address(address))

    def lookup(self, ext: str) -> tuple[str, ExtensionSettings | None]:
        return source_of(self.config, ext)


def _check_ext(ext: str) -> str:
    try:
        check_user_name(ext)
    except ValueError:
        raise ConfigError("invalid extension name") from None
    return ext


def _invoker() -> str:
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


# -- enrollment ----------------------------------------------------------------------


def _show_totp(adm: Admin, ext: str, secret: str, issuer: str, *, qr: bool, qr_file: str | None) -> None:
    uri = provisioning_uri(secret, ext, issuer)
    if qr or qr_file:
        code = _qr_code(uri)
        if code is None:
            print("(no QR code: install python3-segno; type the key below instead)")
        else:
            if qr:
                print("Scan this QR code with your authenticator app:")
                code.terminal(compact=True)
            if qr_file:
                _save_qr(code, qr_file)
                print(f"QR code written to {qr_file} (it holds the secret: mode 0600; delete it after use)")
    grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
    print("Can't scan? Add the account by hand:")
    print(f"  Account:   {ext}")
    print(f"  Issuer:    {issuer}")
    print(f"  Key:       {grouped}")
    print("  Type:      time-based (TOTP), algorithm SHA1, 6 digits, every 30 seconds")
    print(f"  URI:       {uri}")
    sys.stdout.flush()


def _qr_code(uri: str) -> Any:
    try:
        import segno  # optional: QR output only; without it the key is shown as text
    except ImportError:
        return None
    return segno.make(uri, error="m")


def _save_qr(code: Any, path: str) -> None:
    kind = os.path.splitext(path)[1].lower().lstrip(".")
    if kind not in ("png", "svg"):
        raise ConfigError("the QR file must end in .png or .svg", path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create the QR file: {exc.strerror}", path) from None
    with os.fdopen(fd, "wb") as handle:
        code.save(handle, kind=kind, scale=6, border=4)


def _confirm_totp(adm: Admin, secret: str) -> int:
    """Ask for a current code of the new secret; return its time step."""
    key = decode_secret(secret)
    for attempt in range(1, CONFIRM_TRIES + 1):
        answer = adm.prompter.ask("Enter the 6-digit code the app shows now: ", echo=True)
        try:
            return match_totp(key, answer, time.time(), window=adm.config.totp.window)
        except CodeRejected:
            if attempt < CONFIRM_TRIES:
                print("That code is not right; check the app's clock and try the next code.")
    raise CodeRejected(f"confirmation code wrong {CONFIRM_TRIES} times; nothing was saved")


def enroll_totp(adm: Admin, ext: str, *, confirm: bool, issuer: str | None, qr: bool, qr_file: str | None) -> int:
    source, current = adm.lookup(ext)
    writer = writer_for(adm.config, source)  # refuse a read-only source before showing a secret,
    writer.preflight(ext)  # one that cannot take the change,
    adm.store()  # and a state store that cannot be opened
    secret = generate_secret(160)
    issuer = issuer or adm.config.totp.issuer or socket.gethostname()
    if current is not None and current.enrolled:
        if confirm:
            print(f"{ext} already has 2FA ({current.method}); it is replaced only once the new key is confirmed.")
        else:
            print(f"{ext} already has 2FA ({current.method}); --no-confirm: it is replaced by the new key now, "
                  "and the old key stops working at once.")
    _show_totp(adm, ext, secret, issuer, qr=qr, qr_file=qr_file)
    try:
        step = _confirm_totp(adm, secret) if confirm else None
    except CodeRejected:
        adm.audit("enroll", ext, method="totp", source=source, result="not-confirmed")
        raise

    def change(old: dict[str, Any] | None) -> dict[str, Any]:
        kept = {k: v for k, v in (old or {}).items() if k == "email"}
        return {**kept, "method": "totp", "secret": secret, "enabled": True}

    writer.update(ext, change)
    adm.store().record_enrollment(ext, "totp", time.time(), totp_step=step)
    adm.reload_daemon()
    adm.audit("enroll", ext, method="totp", source=source, confirmed="yes" if confirm else "no")
    adm.notify("enrolled", ext, current.email if current is not None else None, method="totp")
    print(SAVED)
    return 0


def enroll_email(adm: Admin, ext: str, *, address: str | None) -> int:
    """Send a code to the address and save only when it comes back.

    An address different from the confirmed one first switches email 2FA off
    for the extension (the old address no longer counts, the new one does not
    yet), as the Yeastar UI does; the code entered turns it on again.
    """
    source, current = adm.lookup(ext)
    writer = writer_for(adm.config, source)
    writer.preflight(ext)
    adm.store()
    target = address or (current.email if current is not None else None)
    if not target:
        raise ConfigError(f"{ext} has no email address in the {source} source; give one with --address")
    _check_address(target)
    if current is not None and current.enrolled and current.method == "email" and current.email != target:
        writer.update(ext, lambda old: {**(old or {}), "method": "email", "email": target, "enabled": False})
        adm.reload_daemon()
        adm.audit("email-address-changed", ext, source=source, result="email-2fa-off-until-confirmed")
        print(f"Email 2FA for {ext} is off until the new address is confirmed.")
    try:
        _send_and_confirm_email(adm, ext, target)
    except CodeRejected:
        adm.audit("enroll", ext, method="email", source=source, result="not-confirmed")
        raise

    def change(old: dict[str, Any] | None) -> dict[str, Any]:
        # A TOTP secret left behind would be one more copy of a key nobody uses.
        return {"method": "email", "email": target, "enabled": True}

    writer.update(ext, change)
    adm.store().record_enrollment(ext, "email", time.time())
    adm.reload_daemon()
    adm.audit("enroll", ext, method="email", source=source, confirmed="yes")
    adm.notify("enrolled", ext, target, method="email")
    before = current.email if current is not None else None
    if before and not notify.same_address(before, target):  # whoever did it may own only the new address
        adm.notify("enrolled", ext, before, method="email", previous=True)
    print(SAVED)
    return 0


def _check_address(address: str) -> None:
    try:
        check_address(address)
    except ValueError as exc:
        raise ConfigError(f"the address {exc}") from None


def _flow_context(adm: Admin) -> Context:
    """The login flow's context for the CLI: the same chain and store a login uses."""
    store = adm.store()
    return Context(adm.config, time.time, build_chain(adm.config, state=lambda: store, clock=time.time), store)


def _send_and_confirm_email(adm: Admin, ext: str, address: str) -> None:
    """Mail a code through the module's own email code path and check what is typed."""
    key = emailcode.load_key(adm.config.email.key_file)
    store = adm.store()
    delivery = emailcode.deliver(store, key, SmtpMailer(adm.config.smtp), adm.config.email, user=ext,
                                 address=address, service="linkus-2fa", rhost=None, now=time.time())
    if delivery.state == emailcode.Delivery.THROTTLED:
        raise delivery.refusal()
    print(delivery.notice(adm.config.prompts))
    for attempt in range(1, CONFIRM_TRIES + 1):
        answer = adm.prompter.ask("Enter the code from the email: ", echo=True)
        try:
            emailcode.verify(store, key, ext, answer, time.time(), address=address)
            return
        except CodeRejected as exc:
            if attempt == CONFIRM_TRIES or "expired" in exc.reason or "no code" in exc.reason:
                raise CodeRejected(f"email confirmation failed ({exc.reason}); nothing was saved") from None
            print("That code is not right; try again.")


# -- the other verbs -----------------------------------------------------------------


def disable(adm: Admin, ext: str) -> int:
    source, current = enrollment.switch_off(adm.config, adm.store(), ext)
    if current is not None:  # switch_off wrote the source
        adm.reload_daemon()
    adm.audit("disable", ext, source=source if current is not None else "-")
    if current is None or not current.enrolled:
        print(f"{ext} had no 2FA enabled; its state (failures, lock, recovery codes) is cleared.")
    else:
        print(f"2FA disabled for {ext}: it logs in with the password alone until it enrolls again.")
        adm.notify("disabled", ext, current.email)  # so a disable the owner did not ask for is noticed
    print(SAVED)
    return 0


def unlock(adm: Admin, ext: str) -> int:
    status = adm.store().lock_status(ext, time.time())
    adm.store().unlock(ext)
    adm.audit("unlock", ext, failures=status.failures)
    print(f"{ext} unlocked ({status.failures} consecutive failures cleared).")
    return 0


def gate_sessions(adm: Admin, ext: str | None) -> int:
    """The web gate's sessions (from the state store, so every host's when it is Redis)."""
    found = adm.store().gate_sessions(ext, time.time())
    if not found:
        print("no gate sessions" + (f" of {ext}" if ext else ""))
        return 0
    rows: list[tuple[str, ...]] = [("ID", "ACCOUNT", "METHOD", "CREATED", "LAST SEEN", "CLIENT")]
    rows += [(sess.id, sess.account, sess.method, _when(sess.created), _when(sess.seen), sess.client or "-")
             for sess in found]
    for line in _columns(rows):
        print(line)
    return 0


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as a table: each column as wide as its widest cell, two spaces between columns.

    Widths come from the data, not fixed: a time stamp with its zone ("2026-12-06 04:33:44 CEST")
    or a long account name never runs into the next column, and nothing is cut (an account name
    is what ``gate-revoke --account`` is given)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def gate_revoke(adm: Admin, session_id: str | None, account: str | None, everyone: bool) -> int:
    """End gate sessions now: linkusd reads the store on every auth check, so the next request is refused."""
    if account is not None:
        account = _check_ext(account)
        ended = adm.store().gate_revoke(account=account)
        adm.audit("gate-revoke", account, ended=ended)
    elif everyone:
        ended = adm.store().gate_revoke(everyone=True)
        adm.audit("gate-revoke", "*", ended=ended)
    else:
        assert session_id is not None
        ended = adm.store().gate_revoke(id=session_id.strip().lower())
        adm.audit("gate-revoke", "-", id=session_id[:16], ended=ended)
    print(f"{ended} gate session{'s' if ended != 1 else ''} ended")
    return 0 if ended or account is not None or everyone else 1


def status(adm: Admin, ext: str) -> int:
    _source, settings = adm.lookup(ext)
    store = adm.store()
    now = time.time()
    info = store.enrollment(ext)
    lock = store.lock_status(ext, now)
    print(f"extension:    {ext}")
    if settings is None:
        print("method:       none (no source knows this extension)")
    else:
        state = "on" if settings.enrolled else "off"
        print(f"method:       {settings.method} (2FA {state}, from the {settings.source} source)")
        if settings.email:
            print(f"email:        {settings.email}")
    print(f"enrolled:     {_when(info.since) if info and info.since else 'unknown (not by linkus-2fa)'}")
    print(f"last success: {_when(info.last_success) if info and info.last_success else 'never'}")
    print(f"failures:     {lock.failures}")
    if lock.locked_until >= FOREVER:
        print("locked:       until an admin runs linkus-2fa unlock")
    elif lock.locked(now):
        print(f"locked:       until {_when(lock.locked_until)}")
    else:
        print("locked:       no")
    print(f"recovery:     {info.recovery_left if info else 0} codes left")
    return 0


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m" if hours else f"{minutes}m {rest % 60}s"


def _counts(counts: object, order: Sequence[str] = ()) -> str:
    """``a 3, b 1`` from a JSON object of counts (``order`` first), or ``none``."""
    if not isinstance(counts, dict) or not any(counts.values()):
        return "none"
    keys = [k for k in order if counts.get(k)] + sorted(k for k in counts if k not in order and counts[k])
    return ", ".join(f"{key} {counts[key]}" for key in keys)


def summary(adm: Admin) -> int:
    """``status`` without an extension: linkusd's own account of itself (STATUS over its PAM socket,
    root only), for an admin without Prometheus; locks linkusd saw are checked against the store now."""
    path = adm.config.daemon.pam_socket
    try:
        reply = call_control(path, Msg.STATUS, timeout=10)
    except (OSError, ProtocolError) as exc:
        raise LinkusError(f"linkusd did not answer on {path} ({type(exc).__name__}); is it running?") from None
    stats = reply.get("summary")
    if not isinstance(stats, dict):
        raise LinkusError(f"linkusd on {path} is older than this command (no summary in its status)")
    now = time.time()
    started = reply.get("started")
    up = _duration(now - started) if isinstance(started, (int, float)) else "?"
    print(f"linkusd:      pid {reply.get('pid')}, version {reply.get('version')}, up {up}")
    if reply.get("socket_problem"):
        print(f"problem:      {reply['socket_problem']}")
    loaded = "loaded" if reply.get("loaded") else "NOT LOADED: every login is refused"
    print(f"config:       {reply.get('config')} ({loaded})")
    last, seconds = stats.get("last_reload"), stats.get("last_reload_seconds")
    if isinstance(last, (int, float)):
        result = "ok" if stats.get("last_reload_ok") else "FAILED"
        print(f"last reload:  {_when(last)}, {result} in {int(float(seconds or 0) * 1000)} ms "
              f"(since start: {_counts(stats.get('reloads'), ('ok', 'failed'))})")
    if reply.get("last_error"):
        print(f"load error:   {reply['last_error']}")
    outcomes = stats.get("last_hour")
    total = sum(outcomes.values()) if isinstance(outcomes, dict) else 0
    print(f"last hour:    {total} logins: {_counts(outcomes, _ORDER)}")
    print(f"errors:       last hour: {_counts(stats.get('errors_last_hour'))}; "
          f"since start: {_counts(stats.get('errors'))}")
    print(f"email codes:  {_counts(stats.get('email_codes'), ('sent', 'throttled'))} (since start)")
    print(f"throttled:    {stats.get('web_throttled', 0)} web sign-ins (since start)")
    print(f"notices:      {_counts(reply.get('notifications'), ('sent', 'dropped'))} (mails to owners and the "
          "admin, since start)")
    print(f"refused:      {_counts(stats.get('refused'))} (connections turned away at accept, since start)")
    print(f"metrics:      {_metrics_state(reply.get('metrics'))}")
    seen = stats.get("locked_seen")
    store = adm.store()
    locked = []
    for account in seen if isinstance(seen, list) else []:
        lock = store.lock_status(str(account), now)
        if lock.locked(now):
            until = "until unlocked" if lock.locked_until >= FOREVER else f"until {_when(lock.locked_until)}"
            locked.append(f"{account} ({until})")
    checked = len(seen) if isinstance(seen, list) else 0
    more = stats.get("locked_seen_count", checked)
    unchecked = f"; {int(more) - checked} older ones not checked" if isinstance(more, int) and more > checked else ""
    print(f"locked now:   {len(locked)}" + (": " + ", ".join(locked) if locked else "")
          + f" (of the locks linkusd has seen since it started{unchecked})")
    return 0


def _metrics_state(state: object) -> str:
    """The /metrics listener as linkusd reports it: off, serving, or not serving and why."""
    if not isinstance(state, dict):
        return "off (metrics.listen not set)"
    if state.get("serving"):
        return f"serving on {state.get('listen')}"
    return (f"NOT serving on {state.get('listen')}: {state.get('why')} (tried {state.get('tries')} times; "
            f"again every {state.get('retry_seconds')} s)")


#: The order outcomes are printed in.
_ORDER = ("success", "skip", "denied", "locked", "unavailable", "conversation")


def list_extensions(adm: Admin) -> int:
    if "yaml" not in adm.config.sources:
        print("The YAML source is not configured; use 'status EXT' for extensions in LDAP.")
        return 0
    extensions = read_extensions(adm.config.yaml.path)
    store = adm.store()
    now = time.time()
    print(f"{'EXTENSION':<16} {'METHOD':<6} {'2FA':<3} {'ENROLLED':<19} {'LAST SUCCESS':<19} FAIL LOCKED RECOVERY")
    for ext, settings in sorted(extensions.items()):
        info = store.enrollment(ext)
        lock = store.lock_status(ext, now)
        locked = "admin" if lock.locked_until >= FOREVER else "yes" if lock.locked(now) else "no"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.since)) if info and info.since else "-"
        last = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.last_success))
                if info and info.last_success else "-")
        print(f"{ext:<16} {settings.method:<6} {'on' if settings.enrolled else 'off':<3} {since:<19} {last:<19} "
              f"{lock.failures:>4} {locked:<6} {info.recovery_left if info else 0}")
    if "ldap" in adm.config.sources:
        print("(extensions in LDAP are not listed; use 'status EXT')")
    return 0


def recovery_codes(adm: Admin, ext: str, count: int | None) -> int:
    _source, settings = adm.lookup(ext)
    if settings is None or not settings.enrolled:
        raise NotEnrolled(f"{ext} has no 2FA enabled; enroll it first")
    count = count or adm.config.recovery_codes
    codes = generate_codes(count)
    salt = new_salt()
    adm.store().set_recovery_codes(ext, salt, [digest(c, salt) for c in codes])
    adm.audit("recovery-codes", ext, count=count)
    adm.notify("recovery-codes", ext, settings.email)
    print(f"Recovery codes for {ext}. Each works once, typed in place of the code from the app.")
    print("They are shown only now; earlier recovery codes no longer work.")
    for code in codes:
        print(f"  {display(code)}")
    print(SAVED)
    return 0


def import_google(adm: Admin, ext: str, path: str | None) -> int:
    if path is None:
        try:
            path = os.path.join(pwd.getpwnam(ext).pw_dir, ".google_authenticator")
        except KeyError:
            raise ConfigError(f"{ext} is not a local user; give the file with --file") from None
    source, current = adm.lookup(ext)
    writer = writer_for(adm.config, source)
    adm.store()
    found = read_file(path)
    short = len(found.secret) * 5 < MIN_SECRET_BITS
    if short and source != "yaml":
        raise ConfigError(f"the key in {path} has fewer than {MIN_SECRET_BITS} bits; the {source} source has no "
                          "place for the migration flag legacy_short_secret: enroll the extension anew instead")

    def change(old: dict[str, Any] | None) -> dict[str, Any]:
        kept = {k: v for k, v in (old or {}).items() if k == "email"}
        entry = {**kept, "method": "totp", "secret": found.secret, "enabled": True}
        if found.period != 30:
            entry["period"] = found.period
        if short:
            # RFC 4226 wants 128 bits; google-authenticator writes 80. The flag keeps
            # the app working, and doctor keeps naming the extension until it re-enrolls.
            entry["legacy_short_secret"] = True
        return entry

    writer.update(ext, change)
    store = adm.store()
    store.record_enrollment(ext, "totp", time.time(), totp_step=found.used_step)
    scratch = [c for c in (normalize_recovery_code(s) for s in found.scratch_codes) if c]
    if scratch:
        salt = new_salt()
        store.set_recovery_codes(ext, salt, [digest(c, salt) for c in scratch])
    adm.reload_daemon()
    adm.audit("import-google", ext, source=source, recovery_codes=len(scratch))
    adm.notify("enrolled", ext, current.email if current is not None else None, method="totp")
    print(f"Imported {path}: the app keeps working; {len(scratch)} scratch codes are now recovery codes.")
    if short:
        print(f"Note: this key has fewer than {MIN_SECRET_BITS} bits (marked legacy_short_secret); "
              "enroll again with a new key soon: `linkus-2fa doctor` lists it until then.")
    print(SAVED)
    return 0


# -- self-service ----------------------------------------------------------------------


def self_service(args: argparse.Namespace) -> int:
    """``linkus-2fa self VERB`` through sudo: only the invoking user's own extension."""
    if os.geteuid() != 0:
        raise ConfigError("run it through sudo: sudo linkus-2fa self ...")
    user = os.environ.get("SUDO_USER", "")
    if not user or user == "root":
        raise ConfigError("self-service is for users running it through sudo (SUDO_USER is not set)")
    _check_ext(user)
    adm = Admin(args, actor=user, via="self")
    try:
        if args.self_verb == "status":
            return status(adm, user)
        _prove_identity(adm, user)
        if args.self_verb == "enroll":
            if args.method == "email":
                return enroll_email(adm, user, address=args.address)
            return enroll_totp(adm, user, confirm=True, issuer=None, qr=not args.no_qr, qr_file=None)
        if args.self_verb == "disable":
            return disable(adm, user)
        if args.self_verb == "recovery-codes":
            return recovery_codes(adm, user, None)
        raise AssertionError(args.self_verb)
    finally:
        adm.close()


def _prove_identity(adm: Admin, user: str) -> None:
    """The account password through PAM, then -- if enrolled -- a current code through the flow."""
    password = adm.prompter.ask("Password: ")
    try:
        accepted = check_password(adm.config.self_service.pam_service, user, password)
    except ServiceRefused as exc:
        raise Denied(f"could not check the password: {exc}") from None
    if not accepted:
        adm.audit("self-check", user, result="wrong-password")
        raise Denied("password not accepted")
    _source, settings = adm.lookup(user)
    if settings is None or not settings.enrolled:
        return
    ctx = _flow_context(adm)
    ctx.echo_code = True
    try:
        decision = decide(LoginRequest(user, service="linkus-2fa"), ctx, adm.prompter)
    except LinkusError:
        adm.audit("self-check", user, result="wrong-code")
        raise
    if decision.outcome != Outcome.SUCCESS:
        # No request address, so no exempt network or grace period applies; should a
        # policy ever skip here anyway, self-service still wants a code it has seen.
        raise Denied(f"a current code is required ({decision.reason})")


# -- command line ------------------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--config and --log-socket, accepted before and after the verb.

    On the verbs the default is SUPPRESS, so an option given before the verb is
    not overwritten by the verb's default.
    """
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH if top else argparse.SUPPRESS,
                        help=f"main config file (default: {DEFAULT_CONFIG_PATH}); before or after the verb "
                        "(not after `self`)")
    parser.add_argument("--log-socket", default="/dev/log" if top else argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linkus-2fa", allow_abbrev=False,
                                     description="Manage pam-linkus two-factor authentication.",
                                     epilog="--config FILE may be given before or after the verb "
                                            "(self-service: never after `self`).")
    _common_options(parser, top=True)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, text: str, sub: Any = verbs, *, options: bool = True,
             aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text, allow_abbrev=False,
                                                       aliases=list(aliases))
        if options:
            _common_options(made, top=False)
        return made

    # "enrol": the British spelling, which people type too (the project writes "enroll")
    enroll = verb("enroll", "turn 2FA on for an extension (TOTP app or email)", aliases=("enrol",))
    enroll.add_argument("ext", help="extension (login name)")
    enroll.add_argument("--method", choices=("totp", "email"), default="totp")
    enroll.add_argument("--no-confirm", action="store_true",
                        help="TOTP: save without asking for a code (bulk); an old key is replaced at once")
    enroll.add_argument("--issuer", help="issuer shown in the app (default: totp.issuer or the host name)")
    enroll.add_argument("--qr-file", help="also write the QR code to this new .png or .svg file")
    enroll.add_argument("--no-qr", action="store_true", help="do not draw the QR code in the terminal")
    enroll.add_argument("--address", help="email: the address (default: the extension's address in its source)")

    for name, text in (("disable", "turn 2FA off (lost phone) and clear the extension's state"),
                       ("unlock", "clear a lockout")):
        verb(name, text).add_argument("ext")
    verb("status", "an extension's method, enrollment, failures, lock; without one: linkusd's summary "
         "(last hour's logins, errors, locks, last reload, uptime)").add_argument("ext", nargs="?")
    verb("list", "every extension of the YAML source with its state")
    verb("gate-sessions", "list the web gate's sessions (all, or one extension's)").add_argument("ext", nargs="?")
    revoke = verb("gate-revoke", "end web gate sessions now (the next request is refused)")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="a session id from gate-sessions")
    which.add_argument("--account", metavar="EXT", help="every session of this extension")
    which.add_argument("--all", action="store_true", help="every session")
    rec = verb("recovery-codes", "make new single-use recovery codes")
    rec.add_argument("ext")
    rec.add_argument("--count", type=int, choices=range(1, 51), metavar="N", help="how many (default: config)")
    imp = verb("import-google", "take over a ~/.google_authenticator file")
    imp.add_argument("ext")
    imp.add_argument("--file", help="the file (default: ~EXT/.google_authenticator)")
    doctor = verb("doctor", "check config, permissions, clock, sources, state, SMTP and PAM lines")
    doctor.add_argument("user", nargs="?", help="also look this extension up")
    doctor.add_argument("--pam-dir", default="/etc/pam.d", help="where the PAM services are (default: %(default)s)")
    doctor.add_argument("--smtp", action="store_true", help="check SMTP even if no extension uses email")
    migrate = verb("migrate-pam", "upgrade from the pam_python version: rewrite its PAM lines into pam_linkus.so "
                   "lines and mark the 80-bit keys it imported (legacy_short_secret)")
    migrate.add_argument("--pam-dir", default="/etc/pam.d", help="where the PAM services are (default: %(default)s)")
    migrate.add_argument("--check", action="store_true",
                         help="only report; exit 1 when something needs migrating")

    # No --config after `self`: a sudoers rule allows `linkus-2fa self *`, and the
    # user must not choose which config (and so which sources) their change goes to.
    own = verb("self", "self-service through sudo: your own extension only", options=False)
    own_verbs = own.add_subparsers(dest="self_verb", required=True, metavar="VERB")
    own_enroll = verb("enroll", "turn 2FA on or change it", own_verbs, options=False, aliases=("enrol",))
    own_enroll.add_argument("--method", choices=("totp", "email"), default="totp")
    own_enroll.add_argument("--address", help="email: the address to confirm")
    own_enroll.add_argument("--no-qr", action="store_true")
    verb("disable", "turn your 2FA off", own_verbs, options=False)
    verb("recovery-codes", "make new recovery codes", own_verbs, options=False)
    verb("status", "show your 2FA status", own_verbs, options=False)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "doctor":
        return run_doctor(args.config, user=args.user, pam_dir=args.pam_dir, smtp=args.smtp, now=time.time())
    if args.verb == "self":
        return self_service(args)
    if args.verb == "migrate-pam":
        pam = migrate_pam.migrate(args.pam_dir, check=args.check)
        return max(pam, migrate_pam.mark_legacy_secrets(args.config, check=args.check))
    adm = Admin(args, actor=_invoker(), via="admin")
    try:
        if args.verb == "list":
            return list_extensions(adm)
        if args.verb == "status" and not args.ext:
            return summary(adm)
        if args.verb == "gate-sessions":
            return gate_sessions(adm, _check_ext(args.ext) if args.ext else None)
        if args.verb == "gate-revoke":
            return gate_revoke(adm, args.id, args.account, args.all)
        ext = _check_ext(args.ext)
        if args.verb == "enroll":
            if args.method == "email":
                return enroll_email(adm, ext, address=args.address)
            return enroll_totp(adm, ext, confirm=not args.no_confirm, issuer=args.issuer,
                               qr=not args.no_qr, qr_file=args.qr_file)
        if args.verb == "disable":
            return disable(adm, ext)
        if args.verb == "unlock":
            return unlock(adm, ext)
        if args.verb == "status":
            return status(adm, ext)
        if args.verb == "recovery-codes":
            return recovery_codes(adm, ext, args.count)
        if args.verb == "import-google":
            return import_google(adm, ext, args.file)
        raise AssertionError(args.verb)
    finally:
        adm.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # an alias names itself in the parsed verb: dispatch on the verb's own name
    for dest in ("verb", "self_verb"):
        if getattr(args, dest, None) == "enrol":
            setattr(args, dest, "enroll")
    try:
        status = int(_dispatch(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return status
    except LinkusError as exc:
        print(f"linkus-2fa: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlinkus-2fa: interrupted; nothing more was saved", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `linkus-2fa list | head`: the reader has gone, which is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # as if killed by SIGPIPE, like other filters


if __name__ == "__main__":
    sys.exit(main())
