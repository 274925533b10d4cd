#!/bin/sh
# restart-checked.sh: the Debian package's upgrade restart of linkusd, only once the new code loads
# the configuration (install.sh does the same with its check_before_restart).
#
# The package is built with dh_installsystemd --no-stop-on-upgrade for linkusd.service, so an
# upgrade neither stops nor restarts the running daemon by itself. The postinst runs this script
# instead: where systemd runs and linkusd.service is active, `linkusd --check` loads the config with
# the new code; only if that succeeds is the service restarted. Otherwise the old daemon keeps
# serving logins with its last good config (a config the old code accepted but the new one reads
# more strictly would leave a restarted daemon refusing every login) and the reason is printed for
# the administrator, who fixes the file and runs `systemctl restart linkusd`.
# Exit status 0 in every case: a refused restart must not leave the package half-configured.
# (LINKUSD and SYSTEMD_RUN exist for tests/test_debian_package.py, which runs this with stand-ins.)
set -u
LINKUSD=${LINKUSD:-/usr/sbin/linkusd}
[ -d "${SYSTEMD_RUN:-/run/systemd/system}" ] || exit 0
systemctl is-active --quiet linkusd.service || exit 0
if out=$("$LINKUSD" --check 2>&1); then
    deb-systemd-invoke restart linkusd.service || \
        echo "libpam-linkus: WARNING: restarting linkusd.service failed; see: systemctl status linkusd" >&2
else
    echo "libpam-linkus: WARNING: the new linkusd does not load its configuration, so the running" >&2
    echo "libpam-linkus: linkusd keeps serving with the old code: ${out}" >&2
    echo "libpam-linkus: fix the file it names, then: systemctl restart linkusd" >&2
fi
exit 0
