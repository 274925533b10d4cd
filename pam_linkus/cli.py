"""``linkus-2fa``: the sysadmin's command, over the same config, sources and state as the module.

``main(argv) -> int``; errors print one line to stderr and exit non-zero. Verbs
reuse pam_linkus/nss_config code: there is no second implementation of anything.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pam_linkus.config import DEFAULT_CONFIG_PATH
from pam_linkus.errors import LinkusError

if TYPE_CHECKING:
    from collections.abc import Sequence


def _doctor(args: argparse.Namespace) -> int:
    """Check config, sources and state the way a login would, and say what is wrong."""
    from nss_config.chain import build_chain
    from pam_linkus.config import load_config
    from pam_linkus.state import open_store

    problems = 0

    def report(ok: bool, what: str, detail: str = "") -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")

    try:
        config = load_config(args.config)
    except LinkusError as exc:
        report(False, "config", exc.reason)
        return 1
    report(True, "config", args.config)
    if "yaml" in config.sources:
        from nss_config.yaml_source import read_extensions

        try:
            extensions = read_extensions(config.yaml.path)
            enrolled = sum(1 for s in extensions.values() if s.enrolled)
            report(True, "yaml source", f"{config.yaml.path}: {len(extensions)} extensions, {enrolled} enrolled")
        except LinkusError as exc:
            report(False, "yaml source", exc.reason)
    try:
        store = open_store(config.state)
        store.close()
        report(True, "state store", config.state.backend)
    except LinkusError as exc:
        report(False, "state store", exc.reason)
    if args.user:
        try:
            found = build_chain(config).lookup(args.user)
            report(True, f"lookup {args.user}", repr(found) if found else "not found (no 2FA)")
        except LinkusError as exc:
            report(False, f"lookup {args.user}", exc.reason)
    return 1 if problems else 0


def _warm(args: argparse.Namespace) -> int:
    """Compile the config and index extensions.yaml now (see pam_linkus.warm)."""
    from pam_linkus.warm import warm

    for line in warm(args.config, args.cache_dir):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linkus-2fa", description="Manage pam-linkus two-factor authentication.")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="main config file (default: %(default)s)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    doctor = verbs.add_parser("doctor", help="check config, sources, state store and PAM lines")
    doctor.add_argument("user", nargs="?", help="also look this extension up")
    doctor.set_defaults(func=_doctor)
    from pam_linkus.filecache import DEFAULT_CACHE_DIR

    warm = verbs.add_parser("warm", help="compile the config and index extensions.yaml for fast logins")
    warm.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                      help="the PAM line's cache_dir= (default: %(default)s)")
    warm.set_defaults(func=_warm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LinkusError as exc:
        print(f"linkus-2fa: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("linkus-2fa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
