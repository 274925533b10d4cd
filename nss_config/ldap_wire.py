"""A minimal LDAPv3 client for the login path: one bind and one search, nothing else.

Why not ldap3: importing it costs about 60 ms of every LDAP login (bench/README.md),
three times the whole budget. A login needs a tiny slice of LDAP -- connect, TLS
(ldaps:// or StartTLS), a simple bind, one search with a size limit, unbind -- and
that slice is small enough to speak directly. ldap3 stays for everything else
(the writer, doctor's step-by-step check).

Safety choices, none configurable:

* TLS is always on and always verified (CA file or the system store, host name,
  TLS >= 1.2) before the bind is sent; the bind needs a DN and a non-empty
  password (an empty one would be an "unauthenticated" bind, RFC 4513 5.1.2).
* Referrals are never followed: a search result "referral" is an error, and a
  continuation reference inside a subtree is skipped, never chased (as ldap3
  with ``auto_referrals=False`` did).
* Every read has a deadline; every message is at most ``MAX_MESSAGE`` bytes; the
  BER decoder accepts definite lengths only and refuses anything malformed.

Every failure is raised as ``LdapWireError`` (the caller names the server and
turns it into SourceUnavailable); no other exception leaves ``search``, except
``ConfigError``-worthy problems reported as ``FilterError`` by ``encode_filter``.

It talks through the C modules ``_socket`` and ``_ssl`` rather than ``socket``
and ``ssl``: those two Python wrappers import ``enum``, ``selectors``,
``collections``, ``re``, ``base64`` ... -- about 10 ms of every login for
conveniences this client does not use. The TLS settings are those of
``ssl.create_default_context`` (which is ``_ssl._SSLContext`` with
PROTOCOL_TLS_CLIENT, CERT_REQUIRED, host name checking, and the CA file or the
system store), plus TLS >= 1.2; the host name is checked by OpenSSL during the
handshake, as with ``ssl``. Both are imported inside the functions that talk to
a server: ``encode_filter`` runs at config load and must stay cheap.
"""

from __future__ import annotations

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    import _socket
    import _ssl
    from typing import Protocol

    class TlsObject(Protocol):
        """What ``_ssl._SSLContext._wrap_socket`` returns (untyped in typeshed)."""

        def do_handshake(self) -> None: ...
        def read(self, size: int, /) -> bytes: ...
        def write(self, data: bytes, /) -> int: ...

    #: One search answer: (DN, attribute name lower-cased -> raw values) per entry,
    #: and whether the server stopped at (or went past) the size limit.
    Entries = tuple[list[tuple[str, dict[str, list[bytes]]]], bool]

#: The largest LDAP message accepted from a server. One entry with a handful of
#: short attributes is a few hundred bytes; a megabyte is generous and bounded.
MAX_MESSAGE = 1 << 20
#: Nesting depth of a search filter (and of nothing else: LDAP messages are shallow).
MAX_FILTER_DEPTH = 16
START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
SCOPES = {"base": 0, "one": 1, "subtree": 2}

# BER tags (RFC 4511 section 4 and appendix B).
_SEQUENCE = 0x30
_INTEGER = 0x02
_OCTET_STRING = 0x04
_BOOLEAN = 0x01
_ENUMERATED = 0x0A
_SET = 0x31
_BIND_REQUEST = 0x60
_BIND_RESPONSE = 0x61
_UNBIND_REQUEST = 0x42
_SEARCH_REQUEST = 0x63
_SEARCH_ENTRY = 0x64
_SEARCH_DONE = 0x65
_SEARCH_REFERENCE = 0x73
_EXTENDED_REQUEST = 0x77
_EXTENDED_RESPONSE = 0x78
_CONTROLS = 0xA0

#: RFC 4511 appendix A result codes, for messages a human reads.
RESULT_NAMES = {
    0: "success", 1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded", 4: "sizeLimitExceeded",
    7: "authMethodNotSupported", 8: "strongerAuthRequired", 10: "referral", 11: "adminLimitExceeded",
    12: "unavailableCriticalExtension", 13: "confidentialityRequired", 16: "noSuchAttribute",
    17: "undefinedAttributeType", 18: "inappropriateMatching", 19: "constraintViolation", 21: "invalidAttributeSyntax",
    32: "noSuchObject", 34: "invalidDNSyntax", 48: "inappropriateAuthentication", 49: "invalidCredentials",
    50: "insufficientAccessRights", 51: "busy", 52: "unavailable", 53: "unwillingToPerform", 80: "other",
}


class LdapWireError(Exception):
    """Anything that went wrong talking to one server (or decoding what it sent)."""


class FilterError(LdapWireError):
    """A search filter this client cannot encode: a configuration error."""


# -- BER encoding -------------------------------------------------------------------------


def tlv(tag: int, content: bytes) -> bytes:
    """One BER element with a definite length (short form below 128 bytes)."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def ber_int(value: int, tag: int = _INTEGER) -> bytes:
    return tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def octets(value: bytes, tag: int = _OCTET_STRING) -> bytes:
    return tlv(tag, value)


def message(message_id: int, op: bytes) -> bytes:
    return tlv(_SEQUENCE, ber_int(message_id) + op)


def bind_request(dn: str, password: str) -> bytes:
    return tlv(_BIND_REQUEST, ber_int(3) + octets(dn.encode("utf-8")) + octets(password.encode("utf-8"), 0x80))


def start_tls_request() -> bytes:
    return tlv(_EXTENDED_REQUEST, octets(START_TLS_OID, 0x80))


def unbind_request() -> bytes:
    return tlv(_UNBIND_REQUEST, b"")


def search_request(base: str, scope: str, filter_ber: bytes, attributes: list[str], *, size_limit: int,
                   time_limit: int) -> bytes:
    attrs = b"".join(octets(name.encode("ascii")) for name in attributes)
    return tlv(_SEARCH_REQUEST, octets(base.encode("utf-8")) + ber_int(SCOPES[scope], _ENUMERATED)
               + ber_int(0, _ENUMERATED)  # derefAliases: neverDerefAliases
               + ber_int(size_limit) + ber_int(time_limit) + tlv(_BOOLEAN, b"\x00") + filter_ber
               + tlv(_SEQUENCE, attrs))


# -- BER decoding -------------------------------------------------------------------------


class Ber:
    """A strict reader over ``data[pos:end]``: definite lengths, one-byte tags, no
    element running past its parent. Every problem is an LdapWireError."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek(self) -> int:
        if self.pos >= self.end:
            raise LdapWireError("malformed BER: element missing")
        return self.data[self.pos]

    def element(self, tag: int) -> Ber:
        """The next element, which must carry ``tag``; returns a reader over its content."""
        found, start, stop = header(self.data, self.pos, self.end)
        if found != tag:
            raise LdapWireError(f"malformed BER: tag 0x{found:02x} where 0x{tag:02x} was expected")
        self.pos = stop
        return Ber(self.data, start, stop)

    def raw(self, tag: int = _OCTET_STRING) -> bytes:
        inner = self.element(tag)
        return inner.data[inner.pos:inner.end]

    def integer(self, tag: int = _INTEGER) -> int:
        raw = self.raw(tag)
        if not 1 <= len(raw) <= 4:
            raise LdapWireError("malformed BER: integer of unexpected size")
        return int.from_bytes(raw, "big", signed=True)

    def text(self, tag: int = _OCTET_STRING) -> str:
        try:
            return self.raw(tag).decode("utf-8")
        except UnicodeDecodeError:
            raise LdapWireError("malformed LDAP string: not UTF-8") from None

    def skip(self) -> None:
        self.pos = header(self.data, self.pos, self.end)[2]

    def done(self) -> None:
        if self.pos != self.end:
            raise LdapWireError("malformed BER: trailing bytes in an element")


def header(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at ``pos``, which must fit before ``end``."""
    if end - pos < 2:
        raise LdapWireError("malformed BER: truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise LdapWireError("malformed BER: multi-byte tag")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise LdapWireError("malformed BER: indefinite length")
    else:
        count = first & 0x7F
        if count > 4:
            raise LdapWireError("malformed BER: length too large")
        if end - pos < count:
            raise LdapWireError("malformed BER: truncated length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if length > end - pos:
        raise LdapWireError("malformed BER: element longer than its container")
    return tag, pos, pos + length


def frame_length(head: bytes) -> int | None:
    """Total size of the LDAPMessage whose first bytes are ``head``, or None if
    more bytes are needed to tell; refuses non-messages and oversized ones."""
    if len(head) < 2:
        return None
    if head[0] != _SEQUENCE:
        raise LdapWireError(f"malformed LDAP message: tag 0x{head[0]:02x}")
    first = head[1]
    if first < 0x80:
        return 2 + first
    if first == 0x80:
        raise LdapWireError("malformed BER: indefinite length")
    count = first & 0x7F
    if count > 4:
        raise LdapWireError("LDAP message too large")
    if len(head) < 2 + count:
        return None
    length = int.from_bytes(head[2:2 + count], "big")
    if length > MAX_MESSAGE:
        raise LdapWireError(f"LDAP message too large ({length} bytes)")
    return 2 + count + length


def decode_message(data: bytes) -> tuple[int, int, Ber]:
    """One whole LDAPMessage -> (messageID, protocolOp tag, reader over the op's content)."""
    if len(data) > MAX_MESSAGE + 6:
        raise LdapWireError("LDAP message too large")
    outer = Ber(data)
    msg = outer.element(_SEQUENCE)
    outer.done()
    message_id = msg.integer()
    if message_id < 0:
        raise LdapWireError("malformed LDAP message: negative message ID")
    tag = msg.peek()
    _, start, stop = header(msg.data, msg.pos, msg.end)
    msg.pos = stop
    if not msg.at_end():
        msg.element(_CONTROLS)  # response controls: none requested, none needed
        msg.done()
    return message_id, tag, Ber(data, start, stop)


def decode_result(op: Ber) -> tuple[int, str]:
    """An LDAPResult (resultCode, diagnosticMessage); referral URLs are read and ignored."""
    code = op.integer(_ENUMERATED)
    op.raw()  # matchedDN
    diagnostic = op.raw().decode("utf-8", "replace")
    return code, diagnostic


def decode_entry(op: Ber) -> tuple[str, dict[str, list[bytes]]]:
    dn = op.text()
    attributes: dict[str, list[bytes]] = {}
    listing = op.element(_SEQUENCE)
    op.done()
    while not listing.at_end():
        partial = listing.element(_SEQUENCE)
        name = partial.text().lower()
        values_set = partial.element(_SET)
        partial.done()
        values = []
        while not values_set.at_end():
            values.append(values_set.raw())
        attributes.setdefault(name, []).extend(values)
    return dn, attributes


def result_name(code: int) -> str:
    return RESULT_NAMES.get(code, f"result {code}")


# -- RFC 4515 filters ---------------------------------------------------------------------


def escape_value(text: str) -> str:
    """RFC 4515 escaping of a value: ``\\``, ``*``, ``(``, ``)`` and NUL, as ldap3's
    ``escape_filter_chars`` (the backslash first, so escapes are not escaped again)."""
    for char, code in (("\\", "\\5c"), ("*", "\\2a"), ("(", "\\28"), (")", "\\29"), ("\x00", "\\00")):
        text = text.replace(char, code)
    return text


def encode_filter(text: str) -> bytes:
    """The BER encoding (RFC 4511 4.5.1.7) of an RFC 4515 filter string.

    Supported: ``&``, ``|``, ``!``, equality, presence, substrings, ``>=``,
    ``<=``, ``~=``, escapes ``\\XX``. Anything else (extensible matches, empty
    ``(&)``, bad escapes, stray characters) raises FilterError.
    """
    parser = _FilterParser(text)
    encoded = parser.filter(0)
    if parser.pos != len(text):
        raise FilterError(f"unexpected text after the filter at position {parser.pos}")
    return encoded


class _FilterParser:
    __slots__ = ("text", "pos")

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> FilterError:
        return FilterError(f"{what} at position {self.pos}")

    def expect(self, char: str) -> None:
        if self.text[self.pos:self.pos + 1] != char:
            raise self.fail(f"expected {char!r}")
        self.pos += 1

    def filter(self, depth: int) -> bytes:
        if depth > MAX_FILTER_DEPTH:
            raise self.fail("filter nested too deeply")
        self.expect("(")
        char = self.text[self.pos:self.pos + 1]
        if char in ("&", "|"):
            self.pos += 1
            parts = []
            while self.text[self.pos:self.pos + 1] == "(":
                parts.append(self.filter(depth + 1))
            if not parts:
                raise self.fail(f"empty {char} list")
            encoded = tlv(0xA0 if char == "&" else 0xA1, b"".join(parts))
        elif char == "!":
            self.pos += 1
            encoded = tlv(0xA2, self.filter(depth + 1))
        else:
            encoded = self.item()
        self.expect(")")
        return encoded

    def item(self) -> bytes:
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isascii()
                                             and (self.text[self.pos].isalnum() or self.text[self.pos] in ".;-")):
            self.pos += 1
        attribute = self.text[start:self.pos]
        if not _is_description(attribute):
            raise self.fail("expected an attribute description")
        rest = self.text[self.pos:self.pos + 2]
        if rest[:1] == ":":
            raise self.fail("extensible matches are not supported")
        tag = {"~=": 0xA8, ">=": 0xA5, "<=": 0xA6}.get(rest)
        if tag is not None:
            self.pos += 2
        else:
            self.expect("=")
        segments = self.value()
        desc = octets(attribute.encode("ascii"))
        if tag is not None:
            if len(segments) != 1:
                raise self.fail("unescaped '*' in a value")
            return tlv(tag, desc + octets(segments[0]))
        if len(segments) == 1:
            return tlv(0xA3, desc + octets(segments[0]))
        if segments == [b"", b""]:
            return tlv(0x87, attribute.encode("ascii"))
        initial, *middle, final = segments
        if any(not part for part in middle):
            raise self.fail("empty substring between '*'")
        parts = (octets(initial, 0x80) if initial else b"") + b"".join(octets(p, 0x81) for p in middle) + (
            octets(final, 0x82) if final else b"")
        return tlv(0xA4, desc + tlv(_SEQUENCE, parts))

    def value(self) -> list[bytes]:
        """The assertion value up to ``)``, split at unescaped ``*``, unescaped."""
        segments = [bytearray()]
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == ")":
                return [bytes(s) for s in segments]
            if char in "(\x00":
                raise self.fail(f"unescaped {char!r} in a value")
            if char == "*":
                segments.append(bytearray())
                self.pos += 1
            elif char == "\\":
                pair = text[self.pos + 1:self.pos + 3]
                if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                    raise self.fail("bad escape (expected \\XX)")
                segments[-1].append(int(pair, 16))
                self.pos += 3
            else:
                segments[-1] += char.encode("utf-8")
                self.pos += 1
        raise self.fail("unterminated filter")


def _is_description(name: str) -> bool:
    """RFC 4512 attribute description: descr or numericoid, then ``;options``."""
    base, *options = name.split(";")
    if not base or not all(option and all(c.isalnum() or c == "-" for c in option) for option in options):
        return False
    if base[0].isdigit():
        return all(part.isdigit() and (part == "0" or part[0] != "0") for part in base.split("."))
    return base[0].isalpha() and all(c.isalnum() or c == "-" for c in base)


# -- talking to one server ------------------------------------------------------------------


def split_uri(uri: str) -> tuple[bool, str, int]:
    """``ldaps://host:port`` -> (ldaps?, host, port); IPv6 literals in brackets."""
    scheme, _, rest = uri.partition("://")
    hostport = rest.split("/", 1)[0]
    ldaps = scheme.lower() == "ldaps"
    default = 636 if ldaps else 389
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise LdapWireError(f"bad URI {uri!r:.100}")
    if not host.isascii():  # an internationalised name: its ASCII form, as ssl would send it
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
    if not host or not all(c.isalnum() or c in ".-:" for c in host):
        raise LdapWireError(f"bad host name in {uri!r:.100}")
    return ldaps, host, port


class Connection:
    """One LDAP conversation over TCP + TLS; every read waits at most ``timeout`` seconds."""

    def __init__(self, sock: _socket.socket, timeout: float):
        self.sock = sock
        self.tls: TlsObject | None = None
        self.timeout = timeout
        self.buffer = bytearray()
        self.next_id = 1

    def send(self, op: bytes) -> int:
        message_id = self.next_id
        self.next_id += 1
        self.write(message(message_id, op))
        return message_id

    def write(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)  # also the TLS layer's timeout
        if self.tls is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            view = view[self.tls.write(view.tobytes()):]

    def secure(self, context: _ssl._SSLContext, host: str) -> None:
        """The TLS handshake (certificate and host name verified by OpenSSL)."""
        self.sock.settimeout(self.timeout)
        tls: TlsObject = context._wrap_socket(self.sock, False, host)  # type: ignore[attr-defined]
        tls.do_handshake()
        self.tls = tls

    def receive(self, expected_id: int) -> tuple[int, Ber]:
        """The next message, which must answer ``expected_id`` (a notice of
        disconnection, message ID 0, is an error)."""
        import time

        deadline = time.monotonic() + self.timeout
        while True:
            size = frame_length(bytes(self.buffer[:6]))
            if size is not None and len(self.buffer) >= size:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the server")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536) if self.tls is None else self.tls.read(65536)
            if not chunk:
                raise LdapWireError("the server closed the connection")
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        message_id, tag, op = decode_message(data)
        if message_id == 0 and tag == _EXTENDED_RESPONSE:
            code, diagnostic = decode_result(op)
            raise LdapWireError(f"the server ended the session ({result_name(code)}: {diagnostic[:100]})")
        if message_id != expected_id:
            raise LdapWireError(f"answer to message {message_id}, expected {expected_id}")
        return tag, op

    def close(self) -> None:
        """Unbind (best effort: the answer is known already) and close."""
        try:
            self.timeout = min(self.timeout, 1.0)
            self.write(message(self.next_id, unbind_request()))
        except OSError:  # _ssl's errors are OSErrors too
            pass
        try:
            self.sock.close()
        except OSError:
            pass


#: ssl.TLSVersion.TLSv1_2
TLS_1_2 = 0x0303


def tls_context(ca_file: str | None) -> _ssl._SSLContext:
    """Verified client context: CA file (or the system store), host name, TLS >= 1.2 --
    what ``ssl.create_default_context(cafile=ca_file)`` builds, without importing ``ssl``.

    Raises OSError (``_ssl.SSLError`` is one) for an unreadable or invalid CA file."""
    import _ssl

    context = _ssl._SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = _ssl.CERT_REQUIRED
    context.check_hostname = True
    context.minimum_version = TLS_1_2
    if ca_file:
        context.load_verify_locations(ca_file)
    else:
        context.set_default_verify_paths()
    return context


def connect(host: str, port: int, timeout: float) -> _socket.socket:
    """``socket.create_connection`` over ``_socket``: each address in turn.

    No exception object is kept in a local: one would form a cycle with this
    frame, freed only by the cyclic GC, perhaps after pam_end (see
    ldap_source.drop_frames for the crash that causes)."""
    import _socket

    class Socket(_socket.socket):
        """_ssl keeps a weak reference to the socket it wraps; _socket.socket has no slot for one."""

        __slots__ = ("__weakref__",)

    problem = f"no address for {host!r:.100}"
    try:
        # Bytes: a str host name goes through the "idna" codec, which imports re and enum.
        addresses = _socket.getaddrinfo(host.encode("ascii"), port, 0, _socket.SOCK_STREAM)
    except OSError as exc:
        addresses = []
        problem = describe(exc)
    for family, kind, proto, _, address in addresses:
        sock = Socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            problem = describe(exc)
            continue
        return sock
    raise LdapWireError(problem)


def search(uri: str, context: _ssl._SSLContext, *, start_tls: bool, connect_timeout: float, timeout: float,
           bind_dn: str, password: str, base: str, scope: str, filter_ber: bytes, attributes: list[str],
           size_limit: int) -> Entries:
    """Connect to ``uri``, secure, bind, search once, unbind.

    Raises LdapWireError for every failure (socket and TLS errors included)."""
    import _socket
    import _ssl

    if not bind_dn or not password:
        raise LdapWireError("a bind DN and a password are required (no anonymous binds)")
    ldaps, host, port = split_uri(uri)
    bind_op = search_op = b""
    try:
        bind_op = bind_request(bind_dn, password)
        search_op = search_request(base, scope, filter_ber, attributes, size_limit=size_limit,
                                   time_limit=max(1, int(timeout)))
    except (UnicodeError, KeyError):  # a lone surrogate in the password file, say
        pass
    if not (bind_op and search_op):
        raise LdapWireError("bind DN, password, base or attributes cannot be encoded")
    raw = connect(host, port, connect_timeout)
    conn = Connection(raw, timeout)
    try:
        # Send each request at once: with Nagle's algorithm the bind, written right after
        # the TLS handshake, waits for a delayed ACK -- 40 ms of every login.
        raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        if not ldaps:
            if not start_tls:
                raise LdapWireError("refusing to bind without TLS")
            tag, op = conn.receive(conn.send(start_tls_request()))
            if tag != _EXTENDED_RESPONSE:
                raise LdapWireError(f"StartTLS: unexpected answer 0x{tag:02x}")
            code, diagnostic = decode_result(op)
            if code != 0:
                raise LdapWireError(f"StartTLS refused ({result_name(code)}: {diagnostic[:100]})")
            if conn.buffer:
                raise LdapWireError("StartTLS: data after the response")
        conn.secure(context, host)
        tag, op = conn.receive(conn.send(bind_op))
        if tag != _BIND_RESPONSE:
            raise LdapWireError(f"bind: unexpected answer 0x{tag:02x}")
        code, diagnostic = decode_result(op)
        if code != 0:
            raise LdapWireError(f"bind as {bind_dn!r:.200} refused ({result_name(code)})")
        search_id = conn.send(search_op)
        entries: list[tuple[str, dict[str, list[bytes]]]] = []
        while True:
            tag, op = conn.receive(search_id)
            if tag == _SEARCH_ENTRY:
                entries.append(decode_entry(op))
                if len(entries) > size_limit:
                    return entries, True  # the server ignored the limit: as ambiguous as "exceeded"
            elif tag == _SEARCH_REFERENCE:
                continue  # a continuation reference: referrals are never followed
            elif tag == _SEARCH_DONE:
                code, diagnostic = decode_result(op)
                if code not in (0, 4):  # success, sizeLimitExceeded
                    raise LdapWireError(f"search failed ({result_name(code)})")
                return entries, code == 4
            else:
                raise LdapWireError(f"search: unexpected answer 0x{tag:02x}")
    except _ssl.SSLCertVerificationError as exc:
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            problem = f"certificate doesn't match any name for {host!r:.100} ({exc.verify_message})"
        else:
            problem = describe(exc)
    except OSError as exc:  # socket errors, timeouts, ssl.SSLError
        problem = describe(exc)
    finally:
        conn.close()
    raise LdapWireError(problem)


def describe(exc: BaseException) -> str:
    """One short line about a socket or TLS error (ssl names its C source lines)."""
    text = " ".join(str(exc).split())
    if text.startswith("_ssl.c:"):  # "_ssl.c:980: The handshake operation timed out"
        text = text.partition(": ")[2]
    cut = text.find("(_ssl.c:")
    if cut >= 0:
        text = text[:cut].rstrip()
    return f"{type(exc).__name__}: {(text or 'no detail')[:200]}"
