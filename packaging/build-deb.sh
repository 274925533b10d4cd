#!/bin/bash
# Build the Debian package (libpam-linkus_VERSION_ARCH.deb) into OUTDIR (default: dist).
# The project keeps its Debian files in packaging/debian; dpkg-buildpackage wants them
# at the top of the source tree, so the build runs in a copy of the checkout in a
# temporary directory: the checkout itself is never written to (except OUTDIR).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(mkdir -p "${1:-$SRC/dist}" && cd "${1:-$SRC/dist}" && pwd)
WORK=$(mktemp -d /tmp/pam-linkus-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

mkdir "$WORK/src"
tar -C "$SRC" -c \
    --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./debian \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache \
    --exclude=.ruff_cache --exclude=./bench/results . | tar -C "$WORK/src" -x
cp -a "$SRC/packaging/debian" "$WORK/src/debian"

# Debian's own tools and interpreter only: pybuild must find /usr/bin/python3.11 with
# Debian's build modules, not a python3 earlier on the caller's PATH (pyenv, a venv).
(cd "$WORK/src" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$WORK" LC_ALL=C.UTF-8 \
    SOURCE_DATE_EPOCH="$(dpkg-parsechangelog -l debian/changelog -S Timestamp)" \
    dpkg-buildpackage -us -uc -b) >"$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
cp "$WORK"/libpam-linkus_*.deb "$WORK"/pam-linkus_*.buildinfo "$WORK"/pam-linkus_*.changes "$OUTDIR"/
ls "$OUTDIR"/libpam-linkus_*.deb
