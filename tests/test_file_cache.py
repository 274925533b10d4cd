"""The compiled caches (pam_linkus.filecache): the extensions index and the config cache.

What must hold: the answer is always the YAML's answer. An edit takes effect on
the very next lookup; a corrupt, truncated, foreign-owned, loosely-permitted,
symlinked or misplaced cache is ignored and rebuilt, never trusted; the file
checks on the YAML run even when the cache is valid; writes are atomic.

Files written by a test are "racy" for filecache.RACY_NS (their timestamps could
still collide with a further edit), so tests that want an index pass a clock
some seconds ahead instead of sleeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SECRET, PamStack, code_at, write_yaml

from nss_config import yaml_index
from nss_config.yaml_source import YamlSource, read_extensions
from pam_linkus import config_cache, filecache
from pam_linkus.config import load_config
from pam_linkus.errors import ConfigError

OTHER = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
LATER = 10 * 1_000_000_000


def later() -> int:
    """A clock 10 s ahead: files written just now count as settled."""
    return time.time_ns() + LATER


def extensions(n: int, *, secret: str = SECRET) -> dict[str, Any]:
    exts: dict[str, Any] = {}
    for i in range(n):
        name = f"{1000 + i}"
        if i % 3 == 0:
            exts[name] = {"method": "totp", "secret": secret}
        elif i % 3 == 1:
            exts[name] = {"method": "email", "email": f"u{i}@example.com"}
        else:
            exts[name] = {"method": "totp", "secret": secret, "enabled": False, "digits": 8}
    return exts


@pytest.fixture
def files(private_dir: Path) -> dict[str, Path]:
    ext = private_dir / "extensions.yaml"
    write_yaml(ext, {"extensions": extensions(100)})
    return {"ext": ext, "cache": private_dir / "cache", "dir": private_dir}


def index_file(files: dict[str, Path]) -> Path:
    return files["cache"] / filecache.cache_name(yaml_index.KIND, str(files["ext"]))


def cache_files(files: dict[str, Path]) -> list[str]:
    """The cache directory's files, without the rebuild locks (which stay, by design)."""
    return sorted(p.name for p in files["cache"].iterdir() if not p.name.endswith(".lock"))


def look(files: dict[str, Path], user: str, clock: Any = later) -> Any:
    return yaml_index.lookup(str(files["ext"]), user, str(files["cache"]), clock_ns=clock)


def same_as_yaml(files: dict[str, Path], users: list[str]) -> None:
    truth = read_extensions(str(files["ext"]))
    for user in users:
        assert look(files, user) == truth.get(user), user


# -- the index answers what the YAML says -------------------------------------------------


def test_index_is_written_and_answers_like_the_yaml(files: dict[str, Path]) -> None:
    assert look(files, "1000").secret == SECRET  # builds the index
    idx = index_file(files)
    st = idx.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    assert files["cache"].stat().st_mode & 0o777 == 0o700
    same_as_yaml(files, [f"{1000 + i}" for i in range(100)] + ["999", "nobody", "1000 ", ""])
    assert idx.stat().st_ino == st.st_ino  # the lookups used it and did not rewrite it
    assert cache_files(files) == [idx.name]  # no temporary files left


def test_a_just_written_file_is_not_indexed_yet(files: dict[str, Path]) -> None:
    assert look(files, "1001", clock=time.time_ns).email == "u1@example.com"
    assert not index_file(files).exists()


def test_edit_takes_effect_on_the_next_lookup_even_with_same_size_and_mtime(files: dict[str, Path]) -> None:
    ext = files["ext"]
    assert look(files, "1000").secret == SECRET
    before = ext.stat()
    text = ext.read_text()
    assert SECRET in text and len(OTHER) == len(SECRET)
    with open(ext, "r+") as f:  # in place: same inode, same size
        f.write(text.replace(SECRET, OTHER, 1))
    os.utime(ext, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
    after = ext.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert look(files, "1000").secret == OTHER


def test_replaced_file_takes_effect(files: dict[str, Path]) -> None:
    assert look(files, "1001").method == "email"
    new = files["dir"] / "new.yaml"
    write_yaml(new, {"extensions": {"1001": {"method": "none"}}})
    os.replace(new, files["ext"])
    assert look(files, "1001").method == "none"
    assert look(files, "1000") is None


def test_broken_yaml_refuses_even_with_a_valid_index(files: dict[str, Path]) -> None:
    assert look(files, "1000") is not None
    files["ext"].write_text(files["ext"].read_text() + "  1000: {method: none}\n")  # unquoted key
    with pytest.raises(ConfigError, match="not a string"):
        look(files, "1000")


def test_insecure_yaml_refuses_even_with_a_valid_index(files: dict[str, Path]) -> None:
    assert look(files, "1000") is not None
    os.chmod(files["ext"], 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        look(files, "1000")


def test_a_symlink_in_place_of_the_yaml_refuses(files: dict[str, Path]) -> None:
    assert look(files, "1000") is not None
    real = files["dir"] / "real.yaml"
    os.replace(files["ext"], real)
    os.symlink(real, files["ext"])
    with pytest.raises(ConfigError, match="symbolic link"):
        look(files, "1000")


# -- a bad index is ignored and rebuilt, never trusted ------------------------------------


def _damage(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["magic", "header", "table", "bucket", "truncated", "empty", "garbage"])
def test_corrupt_index_is_ignored_and_rebuilt(files: dict[str, Path], where: str) -> None:
    look(files, "1000")
    idx = index_file(files)
    good = idx.read_bytes()
    if where == "magic":
        _damage(idx, 0)
    elif where == "header":
        _damage(idx, 20)
    elif where == "table":
        _damage(idx, len(good) - (len(good) - _body_start(good)) + 5)
    elif where == "bucket":
        _damage(idx, len(good) - 3)
    elif where == "truncated":
        idx.write_bytes(good[: len(good) // 2])
    elif where == "empty":
        idx.write_bytes(b"")
    else:
        idx.write_bytes(os.urandom(len(good)))
    os.chmod(idx, 0o600)
    same_as_yaml(files, [f"{1000 + i}" for i in range(100)] + ["nobody"])
    rebuilt = idx.read_bytes()
    assert rebuilt[_body_start(rebuilt):] == good[_body_start(good):]  # rebuilt (the header has a new time)


def _body_start(data: bytes) -> int:
    size = int.from_bytes(data[len(filecache.MAGIC): len(filecache.MAGIC) + 4], "big")
    return len(filecache.MAGIC) + 8 + size


def test_an_index_that_lies_is_not_used_when_its_identity_is_wrong(files: dict[str, Path]) -> None:
    """An index built from other content (say, a copy of an old one) is never served."""
    look(files, "1000")
    idx = index_file(files)
    old = idx.read_bytes()
    write_yaml(files["ext"], {"extensions": {"1000": {"method": "totp", "secret": OTHER}}})
    idx.write_bytes(old)  # put the index of the old content back
    assert look(files, "1000").secret == OTHER


def test_index_of_another_path_is_not_used(files: dict[str, Path]) -> None:
    look(files, "1000")
    other = files["dir"] / "other.yaml"
    write_yaml(other, {"extensions": {}})
    other_name = files["cache"] / filecache.cache_name(yaml_index.KIND, str(other))
    os.link(index_file(files), other_name)  # same bytes under the other path's name
    assert yaml_index.lookup(str(other), "1000", str(files["cache"]), clock_ns=later) is None


@pytest.mark.parametrize("how", ["foreign-owned", "group-readable", "symlink", "directory"])
def test_untrusted_index_file_is_ignored_and_replaced(files: dict[str, Path], how: str) -> None:
    look(files, "1000")
    idx = index_file(files)
    if how == "foreign-owned":
        os.chown(idx, 65534, 65534)
    elif how == "group-readable":
        os.chmod(idx, 0o640)
    elif how == "symlink":
        target = files["dir"] / "planted"
        target.write_bytes(idx.read_bytes())
        os.chmod(target, 0o600)
        idx.unlink()
        os.symlink(target, idx)
    else:
        idx.unlink()
        idx.mkdir()
    assert look(files, "1001").method == "email"
    if how == "directory":
        assert idx.is_dir()  # rename cannot replace a directory; the index is just not used
        return
    st = os.lstat(idx)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600) and not idx.is_symlink()


@pytest.mark.parametrize("how", ["foreign-owned", "group-readable", "symlink", "file"])
def test_untrusted_cache_directory_is_not_used(files: dict[str, Path], how: str) -> None:
    cache = files["cache"]
    if how == "symlink":
        real = files["dir"] / "realcache"
        real.mkdir(mode=0o700)
        os.symlink(real, cache)
    elif how == "file":
        cache.write_text("")
    else:
        cache.mkdir(mode=0o700)
        if how == "foreign-owned":
            os.chown(cache, 65534, 65534)
        else:
            os.chmod(cache, 0o750)
    same_as_yaml(files, ["1000", "1001", "1002", "nobody"])
    if how == "symlink":
        assert list((files["dir"] / "realcache").iterdir()) == []
    elif how != "file":
        assert list(cache.iterdir()) == []


def test_cache_directory_is_created_only_in_a_root_only_parent(private_dir: Path) -> None:
    ext = private_dir / "extensions.yaml"
    write_yaml(ext, {"extensions": extensions(3)})
    loose = private_dir / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert yaml_index.lookup(str(ext), "1000", str(loose / "cache"), clock_ns=later) is not None
    assert not (loose / "cache").exists()
    assert yaml_index.lookup(str(ext), "1000", str(private_dir / "cache"), clock_ns=later) is not None
    assert (private_dir / "cache").stat().st_mode & 0o777 == 0o700


def _replace(files: dict[str, Path], data: Any) -> None:
    """Write the file as an editor or linkus-2fa does: a new file renamed over the old."""
    new = files["dir"] / "new.yaml"
    write_yaml(new, data)
    os.replace(new, files["ext"])


def test_parallel_rebuilds_never_give_a_wrong_answer(files: dict[str, Path]) -> None:
    """Threads look up while the file is replaced under them; every answer is the YAML's
    before or after the change, never something else, and no temporary file is left."""
    _replace(files, {"extensions": extensions(2000)})
    errors: list[str] = []
    lookups = [0]
    stop = time.monotonic() + 3

    def worker() -> None:
        while time.monotonic() < stop:
            try:
                found = look(files, "1000")
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            lookups[0] += 1
            if found is None or found.secret not in (SECRET, OTHER):
                errors.append(repr(found))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for secret in (OTHER, SECRET, OTHER):
        time.sleep(0.5)
        _replace(files, {"extensions": extensions(2000, secret=secret)})
    for t in threads:
        t.join(10)
    assert errors == []
    assert lookups[0] > 10
    assert look(files, "1000").secret == OTHER
    assert cache_files(files) == [index_file(files).name]


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from nss_config import yaml_index
from pam_linkus.filecache import CacheDir, cache_name
path, cache_dir, ready = sys.argv[2], sys.argv[3], sys.argv[4]
with CacheDir.open(cache_dir) as cache, cache.rebuild_lock(cache_name(yaml_index.KIND, path), 10) as locked:
    assert locked
    open(ready, "w").close()
    time.sleep(1.5)
    yaml_index.build(path, cache_dir, clock_ns=lambda: time.time_ns() + 10**10)
"""


def test_a_rebuild_in_progress_is_awaited_not_repeated(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process rebuilds (holds the lock), a lookup waits and then reads its index."""
    files["cache"].mkdir(mode=0o700)
    ready = files["dir"] / "ready"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(REPO), str(files["ext"]), str(files["cache"]),
                               str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        calls: list[str] = []
        original = yaml_index._parse

        def spy(fd: int, path: str) -> Any:
            calls.append(path)
            return original(fd, path)

        monkeypatch.setattr(yaml_index, "_parse", spy)
        assert look(files, "1001").email == "u1@example.com"
        assert calls == []  # it waited for the holder's index instead of parsing
    finally:
        assert holder.wait(30) == 0


def test_a_stuck_lock_only_delays_the_lookup(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    files["cache"].mkdir(mode=0o700)
    monkeypatch.setattr(yaml_index, "REBUILD_WAIT", 0.5)
    name = filecache.cache_name(yaml_index.KIND, str(files["ext"]))
    with filecache.CacheDir.open(str(files["cache"])) as cache, cache.rebuild_lock(name, 1) as locked:
        assert locked
        started = time.monotonic()
        assert look(files, "1001").email == "u1@example.com"  # parsed on its own after the wait
        assert 0.4 < time.monotonic() - started < 10


def test_a_large_fresh_file_is_waited_for_then_indexed(files: dict[str, Path]) -> None:
    """Right after an edit of a large file a login waits (at most RACY_NS) for the file to settle
    and builds the index, instead of parsing unindexed; a small file is just parsed."""
    offset = [0]
    slept: list[float] = []

    def clock() -> int:
        return time.time_ns() + offset[0]

    def sleep(seconds: float) -> None:  # the injected clock moves instead of the test waiting
        slept.append(seconds)
        offset[0] += int(seconds * 1e9)

    assert files["ext"].stat().st_size < yaml_index.SETTLE_WAIT_BYTES
    assert yaml_index.lookup(str(files["ext"]), "1001", str(files["cache"]), clock_ns=clock,
                             sleep=sleep).email == "u1@example.com"
    assert slept == [] and not index_file(files).exists()

    _replace(files, {"extensions": extensions(5000)})
    assert files["ext"].stat().st_size >= yaml_index.SETTLE_WAIT_BYTES
    assert yaml_index.lookup(str(files["ext"]), "1001", str(files["cache"]), clock_ns=clock,
                             sleep=sleep).email == "u1@example.com"
    assert len(slept) == 1 and 0 < slept[0] <= filecache.RACY_NS / 1e9 + 0.02
    assert index_file(files).exists()


def test_lookup_reads_one_bucket_not_the_file(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Flatness: with a warm index a lookup never parses the YAML (yaml_index._parse)."""
    write_yaml(files["ext"], {"extensions": extensions(5000)})
    look(files, "1000")
    calls: list[str] = []
    original = yaml_index._parse

    def spy(fd: int, path: str) -> Any:
        calls.append(path)
        return original(fd, path)

    monkeypatch.setattr(yaml_index, "_parse", spy)
    truth = read_extensions(str(files["ext"]))
    for i in range(0, 5000, 97):
        assert look(files, f"{1000 + i}") == truth[f"{1000 + i}"]
    assert calls == []
    os.utime(files["ext"])  # any change of the file: the next lookup parses again
    assert look(files, "1000") == truth["1000"]
    assert calls == [str(files["ext"])]


def test_yaml_source_without_cache_dir_reads_the_file(files: dict[str, Path]) -> None:
    assert YamlSource(str(files["ext"])).lookup("1001").method == "email"  # type: ignore[union-attr]
    assert not files["cache"].exists()


# -- the config cache ---------------------------------------------------------------------


@pytest.fixture
def config_file(private_dir: Path) -> Path:
    path = private_dir / "pam_linkus.yaml"
    write_yaml(path, {"enforce": "enrolled", "yaml": {"path": str(private_dir / "extensions.yaml")},
                      "lockout": {"max_failures": 7}}, 0o644)
    return path


def _config(path: Path, cache: Path) -> Any:
    return config_cache.load_config_cached(str(path), str(cache), clock_ns=later)


def test_config_cache_gives_the_same_config(config_file: Path, private_dir: Path) -> None:
    cache = private_dir / "cache"
    fresh = load_config(str(config_file))
    first = _config(config_file, cache)  # builds
    name = cache / filecache.cache_name(config_cache.KIND, str(config_file))
    assert name.exists()
    second = _config(config_file, cache)  # from the cache
    for c in (first, second):
        assert (c.enforce, c.sources, c.lockout.max_failures, c.yaml.path, c.state.path) == (
            fresh.enforce, fresh.sources, fresh.lockout.max_failures, fresh.yaml.path, fresh.state.path)
        assert c.cache_dir == str(cache)
    assert fresh.cache_dir is None


def test_config_edit_takes_effect_at_once(config_file: Path, private_dir: Path) -> None:
    cache = private_dir / "cache"
    assert _config(config_file, cache).enforce == "enrolled"
    before = config_file.stat()
    text = config_file.read_text().replace("enforce: enrolled", "enforce: all     ")
    with open(config_file, "r+") as f:
        f.write(text)
    os.utime(config_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert config_file.stat().st_size == before.st_size
    assert _config(config_file, cache).enforce == "all"


def test_config_cache_corrupt_or_foreign_is_rebuilt(config_file: Path, private_dir: Path) -> None:
    cache = private_dir / "cache"
    _config(config_file, cache)
    name = cache / filecache.cache_name(config_cache.KIND, str(config_file))
    good = name.read_bytes()
    _damage(name, len(good) - 2)
    assert _config(config_file, cache).lockout.max_failures == 7
    rebuilt = name.read_bytes()
    assert rebuilt[_body_start(rebuilt):] == good[_body_start(good):]
    os.chown(name, 65534, 65534)
    assert _config(config_file, cache).lockout.max_failures == 7
    assert name.stat().st_uid == 0


def test_config_errors_are_not_cached(config_file: Path, private_dir: Path) -> None:
    cache = private_dir / "cache"
    _config(config_file, cache)
    write_yaml(config_file, {"enforce": "sometimes"}, 0o644)
    with pytest.raises(ConfigError, match="enforce"):
        _config(config_file, cache)
    os.chmod(config_file, 0o666)
    with pytest.raises(ConfigError, match="writable"):
        _config(config_file, cache)


# -- warm, and the index through real PAM -------------------------------------------------


def test_warm_command_waits_for_a_settled_file_and_indexes(pam_stack: PamStack) -> None:
    pam_stack.extensions = extensions(50)
    pam_stack.write_extensions()
    proc = subprocess.run(
        [sys.executable, "-m", "pam_linkus.cli", "--config", str(pam_stack.config_path), "warm",
         "--cache-dir", str(pam_stack.cache_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "compiled" in proc.stdout and "50 extensions, indexed" in proc.stdout
    names = sorted(p.name.split("-")[0] for p in pam_stack.cache_dir.iterdir())
    assert names == ["config", "extensions"]


@pytest.mark.pam
def test_pam_login_uses_the_index_and_sees_an_edit_at_once(pam_stack: PamStack, user: str) -> None:
    from pam_linkus.warm import warm

    pam_stack.extensions = extensions(300)
    pam_stack.enroll_totp(user)
    warm(str(pam_stack.config_path), str(pam_stack.cache_dir))  # waits until the files are settled
    idx = pam_stack.cache_dir / filecache.cache_name(yaml_index.KIND, str(pam_stack.extensions_path))
    built = idx.stat().st_ino
    now = time.time()
    assert pam_stack.login(user, code_at(SECRET, now)).auth == "PAM_SUCCESS"
    assert idx.stat().st_ino == built  # answered from the index, not rebuilt
    # Same size, new secret: the old app's code must stop working on the very next login.
    pam_stack.extensions[user] = {"method": "totp", "secret": OTHER}
    pam_stack.write_extensions()
    old_app = code_at(SECRET, now + 30)
    new_app = code_at(OTHER, now + 30)
    if old_app != new_app:
        assert pam_stack.login(user, old_app).auth == "PAM_AUTH_ERR"
    assert pam_stack.login(user, code_at(OTHER, time.time() + 30)).auth == "PAM_SUCCESS"
