"""The YAML source writer: one entry changes, everything else stays byte for byte; never a broken file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET

from nss_config.yaml_source import read_extensions
from nss_config.yaml_writer import YamlWriter
from pam_linkus.errors import ConfigError, SourceUnavailable

OTHER = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
ORIGINAL = f"""\
# Extensions of the sales PBX -- edited by hand and by linkus-2fa
version: 1
extensions:
  # Alice, front desk
  "1001":   # alice
    method: totp
    # her old phone
    secret: {SECRET}   # set 2024
  "1002":
    method: email
    email: bob@example.com
  # trailing note
...
# after the end
"""


@pytest.fixture
def ext_file(private_dir: Path) -> Path:
    path = private_dir / "extensions.yaml"
    path.write_text(ORIGINAL)
    os.chmod(path, 0o400)
    os.chown(path, 0, 4)
    return path


def set_totp(secret: str) -> Any:
    return lambda old: {**(old or {}), "method": "totp", "secret": secret}


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp"))


def test_only_the_one_entry_changes_and_comments_mode_owner_stay(ext_file: Path) -> None:
    YamlWriter(str(ext_file)).update("1001", set_totp(OTHER))
    text = ext_file.read_text()
    assert text == ORIGINAL.replace(
        f'  "1001":   # alice\n    method: totp\n    # her old phone\n    secret: {SECRET}   # set 2024\n',
        f'  "1001":  # alice\n    # her old phone\n    # set 2024\n    method: totp\n    secret: {OTHER}\n',
    )
    st = ext_file.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o400, 0, 4)
    assert read_extensions(str(ext_file))["1001"].secret == OTHER
    assert leftovers(ext_file) == []


def test_new_entry_is_appended_after_the_last_one(ext_file: Path) -> None:
    YamlWriter(str(ext_file)).update("1003", lambda old: {"method": "totp", "secret": OTHER, "enabled": False})
    text = ext_file.read_text()
    assert text.startswith(ORIGINAL.split('  # trailing note')[0])
    assert f'  "1003":\n    method: totp\n    enabled: false\n    secret: {OTHER}\n  # trailing note\n' in text
    assert set(read_extensions(str(ext_file))) == {"1001", "1002", "1003"}


def test_removing_an_entry(ext_file: Path) -> None:
    YamlWriter(str(ext_file)).update("1002", lambda old: None)
    assert set(read_extensions(str(ext_file))) == {"1001"}
    assert "bob@example.com" not in ext_file.read_text()
    assert "# trailing note" in ext_file.read_text()


def test_removing_the_last_entry_leaves_an_explicit_empty_mapping(ext_file: Path) -> None:
    """An ``extensions`` key with no value is refused (a cut file), so "none left" is written ``{}``."""
    YamlWriter(str(ext_file)).update("1002", lambda old: None)
    YamlWriter(str(ext_file)).update("1001", lambda old: None)
    assert read_extensions(str(ext_file)) == {}
    text = ext_file.read_text()
    assert text.startswith("# Extensions of the sales PBX -- edited by hand and by linkus-2fa\nversion: 1\n"
                           "extensions: {}\n") and text.endswith("  # trailing note\n...\n# after the end\n"), text
    YamlWriter(str(ext_file)).update("7", lambda old: {"method": "totp", "secret": OTHER})
    assert set(read_extensions(str(ext_file))) == {"7"}


def test_an_entry_that_would_refuse_logins_is_never_written(ext_file: Path) -> None:
    with pytest.raises(ConfigError, match="method totp needs a secret"):
        YamlWriter(str(ext_file)).update("1002", lambda old: {"method": "totp"})
    assert ext_file.read_text() == ORIGINAL
    assert leftovers(ext_file) == []


def test_a_broken_file_is_not_edited(ext_file: Path) -> None:
    broken = ORIGINAL.replace("  # trailing note\n", '  "1002":\n    method: none\n')
    ext_file.write_text(broken)
    with pytest.raises(ConfigError, match="duplicate key"):
        YamlWriter(str(ext_file)).update("1003", lambda old: {"method": "none"})
    assert ext_file.read_text() == broken


def test_flow_style_extensions_are_refused_not_guessed(ext_file: Path) -> None:
    flow = '{extensions: {"1001": {method: none}}}\n...\n'
    ext_file.write_text(flow)
    with pytest.raises(ConfigError, match="block mapping"):
        YamlWriter(str(ext_file)).update("1002", lambda old: {"method": "none"})
    assert ext_file.read_text() == flow


def test_an_empty_mapping_gets_its_first_entry(ext_file: Path) -> None:
    for start in ("extensions: {}\n...\n", "# c\nextensions: {}\n...\n", "version: 1\nextensions: {}\n...\n# end\n"):
        ext_file.write_text(start)
        YamlWriter(str(ext_file)).update("7", lambda old: {"method": "totp", "secret": OTHER})
        assert read_extensions(str(ext_file))["7"].secret == OTHER, start
        assert ext_file.read_text().endswith(start[start.index("..."):]), start


def test_a_file_without_an_extensions_mapping_is_not_edited(ext_file: Path) -> None:
    """Such a file is refused as a whole (it may be a cut one), never "repaired" by an edit."""
    for start in ("extensions:\n...\n", "version: 1\n...\n# end\n", "---\n...\n"):
        ext_file.write_text(start)
        with pytest.raises(ConfigError, match=r"write 'extensions: \{\}' for a file with no extensions"):
            YamlWriter(str(ext_file)).update("7", lambda old: {"method": "none"})
        assert ext_file.read_text() == start


def test_a_file_without_the_end_marker_is_not_completed_by_an_edit(ext_file: Path) -> None:
    """Issue 17.6: a file cut short (being written by hand, a full disk) is refused, never
    "repaired" by an edit into a complete file with fewer extensions."""
    for cut in ("", ORIGINAL[:ORIGINAL.index('  "1002"')]):
        ext_file.write_text(cut)
        with pytest.raises(ConfigError, match="has no end marker"):
            YamlWriter(str(ext_file)).update("7", lambda old: {"method": "none"})
        assert ext_file.read_text() == cut
        assert leftovers(ext_file) == []


def test_a_held_lock_makes_the_edit_wait_then_give_up(ext_file: Path) -> None:
    fd = os.open(str(ext_file) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(SourceUnavailable, match="another linkus-2fa"):
            YamlWriter(str(ext_file), lock_timeout=0.3).update("1003", lambda old: {"method": "none"})
    finally:
        os.close(fd)
    assert ext_file.read_text() == ORIGINAL


def test_a_symlinked_source_is_refused(ext_file: Path, private_dir: Path) -> None:
    link = private_dir / "link.yaml"
    link.symlink_to(ext_file)
    with pytest.raises(ConfigError, match="symbolic link"):
        YamlWriter(str(link)).update("1003", lambda old: {"method": "none"})
    assert ext_file.read_text() == ORIGINAL


def test_unusual_names_and_addresses_round_trip(ext_file: Path) -> None:
    writer = YamlWriter(str(ext_file))
    writer.update("o'brien #1: x", lambda old: {"method": "email", "email": "o'b#1@example.com"})
    writer.update("true", lambda old: {"method": "none"})
    found = read_extensions(str(ext_file))
    assert found["o'brien #1: x"].email == "o'b#1@example.com"
    assert found["true"].method == "none"
