"""The text of a code mail and the rules for the addresses it goes to.

Low in the layers (it imports nothing) because three places need it: ``config``
checks a custom subject's placeholders at load, ``mail`` checks sender and recipient
before it connects, and ``emailcode`` fills the message.
"""

from __future__ import annotations

#: Placeholders of the mail subject and body; ``code`` is allowed in the body only.
PLACEHOLDERS = ("code", "user", "host", "time", "rhost", "service", "minutes", "address")

DEFAULT_TEMPLATE = """\
Your verification code for {user} on {host} is:

    {code}

It was requested at {time} from {rhost} ({service}) and is valid for {minutes} minutes.
Nobody from your administration will ever ask you for this code.

If you did not just try to log in or to set up this address for your
account, someone knows your password: change it and tell your administrator.
"""

# RFC 5322 atext: what a dot-atom local part may hold. No quotes, no comments,
# no spaces, no commas, no angle brackets: one plain address, nothing a mail
# header or an SMTP command could be split at.
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-.")
_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def check_address(address: str) -> str:
    """Return ``address`` if it is one plain ``local@domain`` address; else ValueError.

    ASCII only (an internationalised domain is written in its xn-- form); the
    message never echoes the address, which may come from a directory.
    """
    if not isinstance(address, str) or not 3 <= len(address) <= 254:
        raise ValueError("is not one plain address (length)")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(local) > 64:
        raise ValueError("is not one plain address local@domain")
    if not set(local) <= _LOCAL_CHARS or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError("has characters that are not allowed in a plain address")
    labels = domain.split(".")
    if not set(domain) <= _DOMAIN_CHARS or any(
        not label or len(label) > 63 or label.startswith("-") or label.endswith("-") for label in labels
    ):
        raise ValueError("has a domain that is not a plain host name")
    return address


def mask_address(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``: enough to recognise, not to harvest."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders; ``{{`` and ``}}`` are literal braces.

    Deliberately not ``str.format``: a template must not reach attributes
    (``{code.__class__}``) or format specs. An unknown name raises KeyError.
    """
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c in "{}" and template.startswith(c * 2, i):
            out.append(c)
            i += 2
        elif c == "{" and (end := template.find("}", i)) > i:
            name = template[i + 1 : end]
            if name not in values:
                raise KeyError(name[:30])
            out.append(values[name])
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)
