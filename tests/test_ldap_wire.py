"""The login path's own LDAP client (nss_config/ldap_wire.py): its BER and RFC 4515
codec against known encodings, its refusal of malformed input, and its behaviour
against servers that send garbage (a fake server on loopback). The conversation
with a real slapd (TLS, binds, failover, referrals) is in tests/test_source_ldap.py."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ldap_server import Slapd, free_port, ldap_config

from nss_config import ldap_wire
from nss_config.ldap_source import LdapSource
from nss_config.ldap_wire import (
    MAX_MESSAGE,
    Ber,
    FilterError,
    LdapWireError,
    decode_entry,
    decode_message,
    decode_result,
    encode_filter,
    frame_length,
    header,
)
from pam_linkus.config import Config
from pam_linkus.errors import ConfigError, SourceUnavailable

#: RFC 4515 section 4 examples (and the operators it defines), with their BER
#: encodings per RFC 4511 section 4.5.1.7 -- checked against ldap3 + pyasn1 once
#: (test_filters_encode_as_ldap3_does), written out so they hold without ldap3.
KNOWN_FILTERS = {
    "(cn=Babs Jensen)": "a3110402636e040b42616273204a656e73656e",
    "(!(cn=Tim Howes))": "a211a30f0402636e040954696d20486f776573",
    "(&(objectClass=Person)(|(sn=Jensen)(cn=Babs J*)))":
        "a037a315040b6f626a656374436c6173730406506572736f6ea11ea30c0402736e04064a656e73656e"
        "a40e0402636e3008800642616273204a",
    "(o=univ*of*mich*)": "a41504016f30108004756e697681026f6681046d696368",
    "(seeAlso=)": "a30b0407736565416c736f0400",
    "(o=Parens R Us \\28for all your parenthetical needs\\29)":
        "a33304016f042e506172656e7320522055732028666f7220616c6c20796f757220706172656e746865746963616c"
        "206e6565647329",
    "(cn=*\\2A*)": "a4090402636e300381012a",
    "(filename=C:\\5cMyFile)": "a315040866696c656e616d650409433a5c4d7946696c65",
    "(sn=Lu\\c4\\8di\\c4\\87)": "a30d0402736e04074c75c48d69c487",
    "(sn=Lučić)": "a30d0402736e04074c75c48d69c487",
    "(1.3.6.1.4.1.1466.0=\\04\\02\\48\\69)": "a31a0412312e332e362e312e342e312e313436362e30040404024869",
    "(uid=*)": "8703756964",
    "(age>=5)": "a5080403616765040135",
    "(age<=5)": "a6080403616765040135",
    "(cn~=bob)": "a8090402636e0403626f62",
    "(cn=*end)": "a40b0402636e30058203656e64",
    "(cn=start*)": "a40d0402636e300780057374617274",
}


@pytest.mark.parametrize(("text", "encoded"), KNOWN_FILTERS.items())
def test_filters_encode_as_rfc_4511_says(text: str, encoded: str) -> None:
    assert encode_filter(text).hex() == encoded


def test_filters_encode_as_ldap3_does() -> None:
    from ldap3.operation.search import compile_filter, parse_filter
    from pyasn1.codec.ber import encoder

    for text in [*KNOWN_FILTERS, "(&(objectClass=inetOrgPerson)(|(uid=a\\2a)(mail=a\\29\\28)))",
                 "(&(a=1)(!(|(b=2)(c=*x*y*))))"]:
        theirs = encoder.encode(compile_filter(parse_filter(text, None, False, False, None, False).elements[0]))
        assert encode_filter(text) == bytes(theirs), text


@pytest.mark.parametrize("text", [
    "", "cn=x", "(cn=x", "(cn=x))", "(cn=x)(cn=y)", "(&)", "(|)", "(!)", "(!(a=1)(b=2))",
    "(cn:caseExactMatch:=Fred)", "(:dn:2.4.8.10:=Dino)", "(=x)", "(c n=x)", "(cn)", "(cn=a(b)",
    "(cn=\\2)", "(cn=\\zz)", "(cn=a\\)", "(cn=a**b)", "(cn>=a*)", "(cn~=*)", "(cn=a\x00)", "(1x=a)",
    "(01.2=a)", "(cn;=a)", "(_cn=a)", "(&(a=1)" + "(b=2)" * 3,
    "(!" * 40 + "(a=1)" + ")" * 40,
])
def test_filters_that_cannot_be_encoded_are_refused(text: str) -> None:
    with pytest.raises(FilterError):
        encode_filter(text)


def test_an_unencodable_filter_is_a_config_error_at_load() -> None:
    section = {"uris": ["ldaps://h"], "bind_dn": "cn=x", "bind_password_file": "/p", "base": "dc=x"}
    Config.from_mapping({"sources": ["ldap"], "ldap": {**section, "filter": "(&(uid={user})(cn=a*b))"}})
    for bad in ["(uid:dn:={user})", "(&(uid={user})", "(uid={user})(x=1)", "(uid={user}\\q)"]:
        with pytest.raises(ConfigError, match="filter"):
            Config.from_mapping({"sources": ["ldap"], "ldap": {**section, "filter": bad}})


# -- decoding ---------------------------------------------------------------------------------

#: RFC 4511 shaped answers: a BindResponse success, a SearchResultEntry, a SearchResultDone.
BIND_OK = bytes.fromhex("300c02010161070a010004000400")
ENTRY = bytes.fromhex("303b020102643604107569643d612c64633d6578616d706c653022300c040375696431050403616263"
                      "301204046d41696c310a040378407904037a4077")
DONE_WITH_CONTROLS = bytes.fromhex("301702010265070a010004000400a00930070405312e322e33")


def test_decode_bind_response() -> None:
    message_id, tag, op = decode_message(BIND_OK)
    assert (message_id, tag) == (1, 0x61)
    assert decode_result(op) == (0, "")


def test_decode_search_entry() -> None:
    message_id, tag, op = decode_message(ENTRY)
    assert (message_id, tag) == (2, 0x64)
    assert decode_entry(op) == ("uid=a,dc=example", {"uid": [b"abc"], "mail": [b"x@y", b"z@w"]})


def test_response_controls_are_skipped() -> None:
    message_id, tag, op = decode_message(DONE_WITH_CONTROLS)
    assert (message_id, tag, decode_result(op)) == (2, 0x65, (0, ""))


def test_encoded_requests_decode_back() -> None:
    request = ldap_wire.message(7, ldap_wire.search_request(
        "dc=x", "subtree", encode_filter("(uid=a)"), ["mail", "cn"], size_limit=2, time_limit=3))
    message_id, tag, op = decode_message(request)
    assert (message_id, tag) == (7, 0x63)
    assert op.raw() == b"dc=x"
    assert [op.integer(0x0A), op.integer(0x0A), op.integer(), op.integer()] == [2, 0, 2, 3]
    assert op.raw(0x01) == b"\x00" and op.raw(0xA3) == bytes.fromhex("04037569640401") + b"a"
    names = op.element(0x30)
    assert [names.raw(), names.raw()] == [b"mail", b"cn"] and names.at_end()
    op.done()
    big = ldap_wire.message(300, ldap_wire.bind_request("cn=" + "x" * 300, "pw"))
    assert big[:4] == bytes.fromhex("30820142") and decode_message(big)[:2] == (300, 0x60)


@pytest.mark.parametrize("data", [
    BIND_OK[:-1],                                   # truncated
    BIND_OK[:1],                                    # truncated header
    BIND_OK + b"\x00",                              # trailing bytes after the message
    bytes.fromhex("300d02010161070a010004000400"),  # overlong outer length
    bytes.fromhex("300c02010161080a010004000400"),  # inner length past its container
    bytes.fromhex("308002010161070a0100040004000000"),  # indefinite length
    bytes.fromhex("318c02010161070a010004000400"),  # wrong outer tag, bad length
    bytes.fromhex("310c02010161070a010004000400"),  # wrong outer tag (SET)
    bytes.fromhex("300c04010161070a010004000400"),  # message ID not an INTEGER
    bytes.fromhex("300c020101610702010004000400"),  # resultCode not ENUMERATED (caught by decode_result)
    bytes.fromhex("3085000000000c"),                # five length bytes
    bytes.fromhex("300d0201011f6107000004000400"),  # multi-byte tag
    bytes.fromhex("30080200610400000000"),          # empty INTEGER
    bytes.fromhex("300702050102030405"),            # five-byte INTEGER
])
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(LdapWireError):
        op = decode_message(data)[2]
        decode_result(op)
        op.done()


def test_lengths_are_bounded() -> None:
    assert frame_length(b"\x30") is None and frame_length(b"\x30\x82\x01") is None
    assert frame_length(bytes.fromhex("30820100")) == 4 + 256
    assert frame_length((0x30, 0x83, *MAX_MESSAGE.to_bytes(3, "big"))) == 5 + MAX_MESSAGE
    with pytest.raises(LdapWireError, match="too large"):
        frame_length(bytes((0x30, 0x83, *(MAX_MESSAGE + 1).to_bytes(3, "big"))))
    with pytest.raises(LdapWireError, match="too large"):
        frame_length(bytes.fromhex("30850000000001"))
    with pytest.raises(LdapWireError, match="indefinite"):
        frame_length(bytes.fromhex("3080"))
    with pytest.raises(LdapWireError):
        frame_length(bytes.fromhex("0a01"))
    with pytest.raises(LdapWireError):
        header(b"\x04\x84\xff\xff\xff\xff", 0, 6)
    with pytest.raises(LdapWireError):
        Ber(b"\x04\x01").raw()


# -- fake servers: garbage on the wire ----------------------------------------------------------


class FakeServer:
    """Answers the first request on each connection with ``reply``, then waits for
    the client to hang up (at most a few seconds)."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.port = int(self.sock.getsockname()[1])
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                self.received.append(conn.recv(65536))
                if not self.reply:
                    return  # hang up without a word
                conn.sendall(self.reply)
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def fake_server() -> Iterator[list[FakeServer]]:
    servers: list[FakeServer] = []
    yield servers
    for server in servers:
        server.close()


def lookup_via(fake_server: list[FakeServer], reply: bytes, slapd: Slapd, private_dir: Path) -> str:
    server = FakeServer(reply)
    fake_server.append(server)
    pw = private_dir / "pw"
    pw.write_text("secret-password\n")
    pw.chmod(0o600)
    config = Config.from_mapping({"sources": ["ldap"], "ldap": ldap_config(
        slapd, "dc=x", pw, uris=[f"ldap://127.0.0.1:{server.port}"], connect_timeout=1, timeout=1)}).ldap
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as caught:
        LdapSource(config).lookup("alice")
    assert time.monotonic() - started < 5
    # StartTLS was asked first; nothing else (no bind, no password) was sent in clear.
    assert server.received and server.received[0] == ldap_wire.message(1, ldap_wire.start_tls_request())
    assert b"secret-password" not in b"".join(server.received)
    return caught.value.reason


@pytest.mark.parametrize(("reply", "message"), [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "malformed LDAP message"),
    (bytes.fromhex("3084") + (MAX_MESSAGE + 1).to_bytes(4, "big"), "too large"),
    (bytes.fromhex("3080020101"), "indefinite"),
    (bytes.fromhex("3010020101"), "timed out"),  # announces more than it sends
    (bytes.fromhex("300c02010278070a010004000400"), "expected 1"),  # answer to another message
    (bytes.fromhex("300c02010178070a013404000400"), "StartTLS refused \\(unavailable"),
    (bytes.fromhex("300c02010078070a013404000400"), "ended the session"),  # notice of disconnection
    (bytes.fromhex("300c02010161070a010004000400"), "unexpected answer"),  # a bind response to StartTLS
    (b"", "closed the connection"),
])
def test_garbage_from_the_server_is_unavailable(
    fake_server: list[FakeServer], slapd: Slapd, private_dir: Path, reply: bytes, message: str
) -> None:
    reason = lookup_via(fake_server, reply, slapd, private_dir)
    assert reason.startswith("LDAP: no server answered: ldap://127.0.0.1:")
    assert re.search(message, reason), reason


def test_connection_refused_is_named() -> None:
    context = ldap_wire.tls_context(None)
    with pytest.raises(LdapWireError, match="Connection refused"):
        ldap_wire.search(f"ldaps://127.0.0.1:{free_port()}", context, start_tls=True, connect_timeout=1,
                         timeout=1, bind_dn="cn=x", password="p", base="dc=x", scope="subtree",
                         filter_ber=encode_filter("(uid=a)"), attributes=["mail"], size_limit=2)
    with pytest.raises(LdapWireError, match="anonymous"):
        ldap_wire.search("ldaps://127.0.0.1:1", context, start_tls=True, connect_timeout=1, timeout=1,
                         bind_dn="cn=x", password="", base="dc=x", scope="subtree",
                         filter_ber=encode_filter("(uid=a)"), attributes=["mail"], size_limit=2)


def test_uris_split() -> None:
    assert ldap_wire.split_uri("ldaps://h") == (True, "h", 636)
    assert ldap_wire.split_uri("ldap://h:1389/") == (False, "h", 1389)
    assert ldap_wire.split_uri("ldaps://[::1]:7636") == (True, "::1", 7636)
    assert ldap_wire.split_uri("ldaps://bücher.example") == (True, "xn--bcher-kva.example", 636)
    for bad in ["ldap://h:x", "ldap://h:0", "ldap://:1", "ldap://h\x00x", "ldap://a b", "ldaps://h%2f"]:
        with pytest.raises(LdapWireError):
            ldap_wire.split_uri(bad)


def test_tls_context_is_the_default_context_plus_tls_1_2() -> None:
    import ssl

    ours = ldap_wire.tls_context(None)
    theirs = ssl.create_default_context()
    assert (ours.verify_mode, ours.check_hostname, ours.minimum_version) == (
        ssl.CERT_REQUIRED, True, ssl.TLSVersion.TLSv1_2)
    assert (ours.options, ours.verify_flags, ours.protocol) == (theirs.options, theirs.verify_flags, theirs.protocol)
    assert ours.get_ciphers() == theirs.get_ciphers()
    with pytest.raises(OSError):
        ldap_wire.tls_context("/nonexistent/ca.pem")
