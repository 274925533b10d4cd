#!/bin/bash
# Install pam-linkus from this checkout (`make install`, after `make deps-runtime`):
#   - native/pam_linkus.so, built here, into the PAM module directory of this architecture;
#   - the Python package into PREFIX/venv (on /usr/bin/python3, with Debian's python3-yaml,
#     -ldap3, -redis, -segno visible), and linkusd / linkus-2fa on PATH in /usr/local/sbin;
#   - /etc/pam_linkus (config files made once, never overwritten), /var/lib/pam_linkus;
#   - the LDAP schema (packaging/ldap) into /usr/share/pam-linkus/ldap and add-end-marker.sh into
#     /usr/share/pam-linkus, as the Debian package does; the fail2ban filter and disabled jail into
#     /usr/share/pam-linkus/fail2ban, and into /etc/fail2ban when fail2ban is there (never over a file);
#   - linkusd started: by systemd socket activation when systemd is PID 1, else in the
#     background (it daemonizes once ready); a running one is restarted with the new code.
#   - /etc/pam.d/linkus-2fa, the self-service page's password-only PAM service, made only if absent.
# No existing /etc/pam.d file is touched, except by `linkus-2fa migrate-pam` when an upgrade from the
# pam_python version asks for it (LINKUS_MIGRATE_PAM=yes).
set -euo pipefail
PREFIX=${1:-/opt/pam-linkus}
SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=$PREFIX/venv
RUN_DIR=/run/linkusd
# The running linkusd is restarted only once the new code loads its config (the arguments are its own,
# minus the ones that do not matter to a check): a config the old daemon kept only as "last good" in
# memory, or one the new code reads more strictly, would leave the new daemon refusing every login.
check_before_restart() {
    local cmd=("$1") arg skip=0
    shift
    for arg in "$@"; do
        if [ "$skip" = 1 ]; then cmd+=("$arg"); skip=0; continue; fi
        case "$arg" in
            --config) cmd+=("$arg"); skip=1 ;;
            --config=*) cmd+=("$arg") ;;
        esac
    done
    if ! out=$("${cmd[@]}" --check 2>&1); then
        die "the new code does not load linkusd's configuration, so the running linkusd keeps serving with the old code: ${out}. Fix the file it names, then run the install again."
    fi
}

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"

# --- Upgrade from the pam_python version: its PAM lines start Python inside every login
# (a local-root hole through su/sudo). They must become pam_linkus.so lines first; refusing
# here, before anything changes, leaves the machine as it was.
old_lines() {
    grep -lsE '^[[:space:]]*-?(auth|account|password|session)[[:space:]].*pam_python\.so[[:space:]]+([^[:space:]]*/)?pam_linkus\.py' \
        /etc/pam.d/* 2>/dev/null | grep -vE '\.(linkus-bak|dpkg-[a-z]+|ucf-[a-z]+)$' || true
}
OLD=$(old_lines)
if [ -n "$OLD" ] && [ "${LINKUS_MIGRATE_PAM:-}" != yes ]; then
    {
        echo "install.sh: these PAM services still load the old pam_python module (pam_linkus.py):"
        echo "$OLD" | sed 's/^/install.sh:   /'
        echo "install.sh: it runs Python inside every login (a local-root hole through su/sudo) and will"
        echo "install.sh: stop working. Nothing has been changed. Either let this script install the new"
        echo "install.sh: module and linkusd and then rewrite those lines (linkus-2fa migrate-pam, which keeps"
        echo "install.sh: each file's old text as FILE.linkus-bak):"
        echo "install.sh:   LINKUS_MIGRATE_PAM=yes make install"
        echo "install.sh: or replace each of those lines yourself (keep a root shell open) with:"
        echo "install.sh:   auth [success=ok ignore=ignore default=die] pam_linkus.so"
    } >&2
    exit 1
fi

# --- The C module, into the directory where this system's pam_unix.so lives.
make -s -C "$SRC/native" pam_linkus.so
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
PAM_DIR=
for dir in "/lib/$MULTIARCH/security" "/usr/lib/$MULTIARCH/security" /lib/security /usr/lib/security; do
    if [ -e "$dir/pam_unix.so" ]; then PAM_DIR=$dir; break; fi
done
[ -n "$PAM_DIR" ] || die "cannot find the PAM module directory (no pam_unix.so)"
install -o root -g root -m 0644 "$SRC/native/pam_linkus.so" "$PAM_DIR/pam_linkus.so.new"
mv -f "$PAM_DIR/pam_linkus.so.new" "$PAM_DIR/pam_linkus.so"

# --- The engine: a venv on Debian's interpreter. Built with the venv's setuptools and Debian's
# python3-wheel, as the Debian package is: nothing is downloaded (no isolated build from PyPI).
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-deps --no-build-isolation --upgrade "$SRC"
ln -sfn "$VENV/bin/linkus-2fa" /usr/local/sbin/linkus-2fa
ln -sfn "$VENV/bin/linkusd" /usr/local/sbin/linkusd
ln -sfn "$VENV/bin/linkus-web" /usr/local/bin/linkus-web

# --- The LDAP schema, where pam_linkus.yaml(5), the schema's own comments and the Debian package
# put it (slapd.conf: include /usr/share/pam-linkus/ldap/linkus-2fa.schema).
install -d -o root -g root -m 0755 /usr/share/pam-linkus /usr/share/pam-linkus/ldap
for file in linkus-2fa.schema linkus-2fa.ldif; do
    install -o root -g root -m 0644 "$SRC/packaging/ldap/$file" "/usr/share/pam-linkus/ldap/$file"
done

# --- fail2ban: the filter and the jail (enabled = false), as the Debian package ships them
# (docs/fail2ban.md). Copied into /etc/fail2ban only where fail2ban is installed and only when the
# file is not there yet: an administrator's own version is never replaced, and nothing is enabled.
install -d -o root -g root -m 0755 /usr/share/pam-linkus/fail2ban/filter.d /usr/share/pam-linkus/fail2ban/jail.d
for file in filter.d/pam-linkus.conf jail.d/pam-linkus.conf; do
    install -o root -g root -m 0644 "$SRC/packaging/fail2ban/$file" "/usr/share/pam-linkus/fail2ban/$file"
    if [ -d /etc/fail2ban ] && [ ! -e "/etc/fail2ban/$file" ] && [ ! -L "/etc/fail2ban/$file" ]; then
        install -D -o root -g root -m 0644 "$SRC/packaging/fail2ban/$file" "/etc/fail2ban/$file"
    fi
done

# --- Config, state, the web socket's group.
# linkus-web: the group opens linkusd's web socket; the user runs linkus-web.service.
getent group linkus-web >/dev/null || groupadd --system linkus-web
getent passwd linkus-web >/dev/null ||
    useradd --system --gid linkus-web --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin linkus-web
install -d -o root -g root -m 0755 /etc/pam_linkus
install -d -o root -g root -m 0700 /var/lib/pam_linkus
for file in pam_linkus.yaml extensions.yaml; do
    if [ ! -e "/etc/pam_linkus/$file" ] && [ ! -L "/etc/pam_linkus/$file" ]; then
        install -o root -g root -m 0600 "$SRC/packaging/$file" "/etc/pam_linkus/$file"
    fi
done
# This version refuses a config or extensions file whose last line is not the YAML end marker "..."
# (a cut-short file must not switch 2FA off): one from an older version gets it once here, before the
# new linkusd starts, by the same script the Debian package's postinst runs.
install -o root -g root -m 0755 "$SRC/packaging/add-end-marker.sh" /usr/share/pam-linkus/add-end-marker.sh
sh /usr/share/pam-linkus/add-end-marker.sh /etc/pam_linkus/pam_linkus.yaml /etc/pam_linkus/extensions.yaml

# The PAM service linkusd checks web passwords with (self_service.pam_service, default linkus-2fa):
# password modules only. Made once when there is none; an existing one -- the administrator's, or a
# symlink -- is never edited (like every other PAM file here).
pam_service=/etc/pam.d/linkus-2fa
if [ ! -e "$pam_service" ] && [ ! -L "$pam_service" ]; then
    cat > "$pam_service.new" <<'PAM'
# linkus-web's password check (pam_linkus.yaml: self_service.pam_service). Password modules only:
# linkusd refuses a service that loads pam_linkus, directly or through an include.
auth    required pam_unix.so
account required pam_unix.so
PAM
    chmod 0644 "$pam_service.new"
    mv -f "$pam_service.new" "$pam_service"
fi

# --- linkusd.
# Its sockets' directory: 0755 root, as linkusd.socket's DirectoryMode= and linkusd itself make it;
# this also repairs the 0700 one an older linkusd made under its umask (linkus-web and the
# allowed_groups callers could not reach their sockets through it).
install -d -o root -g root -m 0755 "$RUN_DIR"
if [ -d /run/systemd/system ]; then
    # Every unit of packaging/systemd (linkus-web's too, enabled only by the administrator),
    # with the commands where this venv has them.
    for path in "$SRC"/packaging/systemd/*.socket "$SRC"/packaging/systemd/*.service; do
        unit=$(basename "$path")
        sed -E "s|^ExecStart=/usr/s?bin/(linkusd\|linkus-web)\b|ExecStart=$VENV/bin/\1|" "$path" \
            > "/etc/systemd/system/$unit.new"
        chmod 0644 "/etc/systemd/system/$unit.new"
        mv -f "/etc/systemd/system/$unit.new" "/etc/systemd/system/$unit"
    done
    systemctl daemon-reload
    systemctl enable --now linkusd.socket linkusd-web.socket
    # An upgrade: the running daemon gets the new code (logins in progress end as unavailable), once
    # the new code loads the config: else it keeps the old daemon serving (see check_before_restart).
    if systemctl -q is-active linkusd.service; then
        check_before_restart "$VENV/bin/linkusd"
        systemctl try-restart linkusd.service
    fi
    say "linkusd: systemd socket activation (linkusd.socket, linkusd-web.socket)"
elif [ -e "$RUN_DIR/linkusd.lock" ] && ! flock -n "$RUN_DIR/linkusd.lock" true; then
    pid=$(head -n 1 "$RUN_DIR/linkusd.lock")
    [[ "$pid" =~ ^[0-9]+$ ]] || die "$RUN_DIR/linkusd.lock is held but names no pid"
    # An upgrade: the running daemon gets the new code, as systemd's try-restart above does (logins
    # in progress, and those of the second it takes, end as unavailable: never let in), with the
    # arguments it was started with (its own --config, sockets ...), after the new code loaded its config.
    mapfile -d '' -t running < "/proc/$pid/cmdline"
    args=()  # its arguments (after python and the linkusd script), less those that keep it in the foreground
    for arg in "${running[@]:2}"; do
        case "$arg" in --foreground|--quiet) ;; *) args+=("$arg") ;; esac
    done
    check_before_restart /usr/local/sbin/linkusd "${args[@]}"
    kill -TERM "$pid"
    flock -w 20 "$RUN_DIR/linkusd.lock" true || die "linkusd (pid $pid) did not stop within 20 s"
    /usr/local/sbin/linkusd "${args[@]}" || die "linkusd did not start (see: journalctl -t linkusd, or /var/log/auth.log)"
    say "linkusd restarted with the new code (no systemd): pid $(head -n 1 "$RUN_DIR/linkusd.lock"), was $pid"
else
    /usr/local/sbin/linkusd || die "linkusd did not start (see: journalctl -t linkusd, or /var/log/auth.log)"
    say "linkusd started in the background (no systemd): pid $(head -n 1 "$RUN_DIR/linkusd.lock")"
fi

# --- The rest of the upgrade, now that pam_linkus.so and linkusd are in place.
if [ -n "$OLD" ]; then
    say "LINKUS_MIGRATE_PAM=yes: rewriting the old PAM lines (backups: FILE.linkus-bak)"
    /usr/local/sbin/linkus-2fa migrate-pam || die "linkus-2fa migrate-pam failed; the files it names are unchanged"
    [ -z "$(old_lines)" ] || die "some PAM services still load pam_linkus.py (see above); rewrite them by hand"
fi
rm -rf /var/lib/pam_linkus/cache
rm -f /lib/security/pam_linkus.py

say "installed $PAM_DIR/pam_linkus.so, $VENV, /usr/local/sbin/{linkusd,linkus-2fa}, /usr/local/bin/linkus-web, /etc/pam_linkus/, /usr/share/pam-linkus/ldap/"
if [ -d /run/systemd/system ]; then
    say "the Security Settings page: systemctl enable --now linkus-web (docs/web.md)"
else
    say "the Security Settings page (no systemd): see docs/web.md, \"Without systemd\""
fi
say "next: linkus-2fa doctor; then add to a service, after the password module:"
say "  auth [success=ok ignore=ignore default=die] pam_linkus.so"
