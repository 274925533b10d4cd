"""The contract every settings source keeps (nss_config.base), tested once.

Each source's test module subclasses ``SourceContract`` and provides the
``make_source`` fixture: given entries by user name in our keys (``method``,
``secret``, ``enabled`` ...), it stores them in its backend (a YAML file, LDAP
entries) and returns a source reading them. Like keyring's backend suite: one
set of expectations, so the sources accept and refuse exactly the same things.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from nss_config.base import ExtensionSettings
from pam_linkus.errors import Unavailable

if TYPE_CHECKING:
    from nss_config.base import SettingsSource

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
OTHER_SECRET = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"

MakeSource = Callable[[dict[str, dict[str, Any]]], "SettingsSource"]

#: Names that must match nothing, however the source builds its query.
METACHARACTER_NAMES = [
    "*",
    "*)(uid=*",
    "*)(|(uid=*",
    "alice)(uid=*",
    "al*",
    "*ice",
    "\\2a",
    "alice\\",
    "(uid=alice)",
    "alice)(objectClass=*",
    "alice\x00",
]


def _name() -> str:
    return f"ext{secrets.token_hex(3)}"


class SourceContract:
    """Subclass as ``Test<Name>Source`` and define the ``make_source`` fixture."""

    #: What ``ExtensionSettings.source`` says for this source.
    source_name = "?"

    @pytest.fixture
    def make_source(self) -> MakeSource:
        raise NotImplementedError

    def test_found_totp_with_defaults(self, make_source: MakeSource) -> None:
        user = _name()
        source = make_source({user: {"method": "totp", "secret": SECRET}})
        found = source.lookup(user)
        assert found == ExtensionSettings(user, "totp", secret=SECRET, source=self.source_name)
        assert found is not None and found.enrolled is True

    def test_found_totp_with_every_key(self, make_source: MakeSource) -> None:
        user = _name()
        source = make_source({user: {"method": "totp", "secret": OTHER_SECRET, "algorithm": "SHA256",
                                     "digits": 8, "period": 60, "enabled": True}})
        assert source.lookup(user) == ExtensionSettings(
            user, "totp", secret=OTHER_SECRET, algorithm="SHA256", digits=8, period=60, source=self.source_name)

    def test_found_email(self, make_source: MakeSource) -> None:
        user = _name()
        source = make_source({user: {"method": "email", "email": "alice@example.com"}})
        assert source.lookup(user) == ExtensionSettings(
            user, "email", email="alice@example.com", source=self.source_name)

    def test_disabled_entry_is_found_but_not_enrolled(self, make_source: MakeSource) -> None:
        user = _name()
        source = make_source({user: {"method": "totp", "secret": SECRET, "enabled": False}})
        found = source.lookup(user)
        assert found is not None and found.enabled is False and found.enrolled is False

    def test_method_none_is_found_but_not_enrolled(self, make_source: MakeSource) -> None:
        user = _name()
        found = make_source({user: {"method": "none"}}).lookup(user)
        assert found is not None and found.method == "none" and found.enrolled is False

    def test_unknown_user_is_not_here(self, make_source: MakeSource) -> None:
        source = make_source({_name(): {"method": "totp", "secret": SECRET}})
        assert source.lookup(_name()) is None

    def test_name_differing_in_a_prefix_is_not_here(self, make_source: MakeSource) -> None:
        user = _name()
        source = make_source({user: {"method": "totp", "secret": SECRET}})
        assert source.lookup(user[:-1]) is None
        assert source.lookup(user + "0") is None

    @pytest.mark.parametrize("entry", [
        {"method": "sms"},
        {"method": "totp"},
        {"method": "totp", "secret": "not base32 at all!"},
        {"method": "totp", "secret": "JBSWY3DP"},
        {"method": "totp", "secret": SECRET, "digits": 7},
        {"method": "totp", "secret": SECRET, "period": 5},
        {"method": "totp", "secret": SECRET, "algorithm": "MD5"},
        {"method": "email"},
        {"secret": SECRET},
    ], ids=["method", "no-secret", "secret-not-base32", "secret-short", "digits", "period", "algorithm",
            "no-email", "no-method"])
    def test_malformed_entry_is_unavailable_without_echoing_values(
        self, make_source: MakeSource, entry: dict[str, Any]
    ) -> None:
        user = _name()
        with pytest.raises(Unavailable) as caught:  # at load (YAML) or at lookup (LDAP)
            make_source({user: entry}).lookup(user)
        for value in entry.values():
            if isinstance(value, str) and len(value) > 4 and value not in ("totp", "email"):
                assert value not in caught.value.reason

    @pytest.mark.parametrize("name", METACHARACTER_NAMES, ids=repr)
    def test_metacharacters_in_the_name_match_nothing(self, make_source: MakeSource, name: str) -> None:
        source = make_source({
            "alice": {"method": "totp", "secret": SECRET},
            "bob": {"method": "email", "email": "bob@example.com"},
        })
        assert source.lookup(name) is None
        assert source.lookup("alice") is not None  # the entries are there: the miss is the escaping's doing

    def test_names_with_metacharacters_are_looked_up_literally(self, make_source: MakeSource) -> None:
        source = make_source({
            "a*b": {"method": "totp", "secret": SECRET},
            "c(d)": {"method": "email", "email": "cd@example.com"},
            "e\\f": {"method": "none"},
        })
        found = source.lookup("a*b")
        assert found is not None and found.user == "a*b" and found.method == "totp"
        found = source.lookup("c(d)")
        assert found is not None and found.email == "cd@example.com"
        found = source.lookup("e\\f")
        assert found is not None and found.method == "none"
        for miss in ("a*", "a", "ab", "axb", "c", "c(", "e", "e\\"):
            assert source.lookup(miss) is None, miss

    def test_secret_never_in_repr(self, make_source: MakeSource) -> None:
        user = _name()
        found = make_source({user: {"method": "totp", "secret": SECRET}}).lookup(user)
        assert SECRET not in repr(found)

    def test_name_variants_map_to_one_canonical_account(self, make_source: MakeSource) -> None:
        """Issue 12 item 1: state is keyed by ``account``, so every variant the source
        matches must carry the same canonical name (the entry's own spelling)."""
        source = make_source({"h1La": {"method": "totp", "secret": SECRET}})
        accounts = set()
        for variant in ("h1La", "h1la", "H1LA", "H1la"):
            found = source.lookup(variant)
            assert found is not None, variant
            accounts.add(found.account)
        assert accounts == {"h1La"}

    @pytest.mark.parametrize("name", [
        "alice ", " alice", "alice\t", "\talice", "ali\nce", "alice\x00", "alice\x7f", "alice\x85",
        "alice\u2028", "alice\udcff", "\udcffalice", "", "a" * 1000,
    ], ids=repr)
    def test_names_with_spaces_controls_or_bad_utf8_match_nothing(self, make_source: MakeSource, name: str) -> None:
        source = make_source({"alice": {"method": "totp", "secret": SECRET}})
        assert source.lookup(name) is None
        assert source.lookup("alice") is not None
