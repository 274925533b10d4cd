#!/bin/bash
# Install pam-linkus from this checkout: the package into PREFIX/venv (on /usr/bin/python3, the
# interpreter pam_python embeds, with Debian's python3-yaml & co. visible), the file pam_python loads
# into /lib/security, the linkus-2fa command on PATH, default config and the state directory.
# Existing config files are never overwritten. No /etc/pam.d file is touched.
set -euo pipefail
PREFIX=${1:-/opt/pam-linkus}
SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=$PREFIX/venv
SITE=$VENV/lib/python3.11/site-packages

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
# Built with the venv's setuptools and Debian's python3-wheel, as the Debian package is:
# nothing is downloaded (no isolated build environment from PyPI).
"$VENV/bin/pip" install -q --no-deps --no-build-isolation --upgrade "$SRC"

sed "s|@SITE@|$SITE|" "$SRC/packaging/pam_linkus.py" > /lib/security/pam_linkus.py.new
chmod 0644 /lib/security/pam_linkus.py.new
mv -f /lib/security/pam_linkus.py.new /lib/security/pam_linkus.py
ln -sfn "$VENV/bin/linkus-2fa" /usr/local/sbin/linkus-2fa

install -d -o root -g root -m 0755 /etc/pam_linkus
install -d -o root -g root -m 0700 /var/lib/pam_linkus
if [ ! -e /etc/pam_linkus/pam_linkus.yaml ]; then
    install -o root -g root -m 0600 "$SRC/packaging/pam_linkus.yaml" /etc/pam_linkus/pam_linkus.yaml
fi
if [ ! -e /etc/pam_linkus/extensions.yaml ]; then
    install -o root -g root -m 0600 "$SRC/packaging/extensions.yaml" /etc/pam_linkus/extensions.yaml
fi
echo "pam-linkus installed: /lib/security/pam_linkus.py, $VENV, /usr/local/sbin/linkus-2fa, /etc/pam_linkus/"
echo "Next: linkus-2fa doctor; then add the PAM line to a service (see README.md)."
