#!/bin/bash
# Install the named Debian packages that are not installed yet (apt-get update first, once).
# Waits for the dpkg lock instead of failing when another apt run holds it.
# Services the packages would start on their own (nginx on port 80, fail2ban's default sshd jail
# acting on this host's firewall, slapd, redis) are kept stopped while installing, through a
# policy-rc.d for the length of this run: the tests start their own copies on loopback, and a
# developer's machine must not gain running services from `make test`. An existing policy-rc.d
# is left as it is.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "apt: installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# pam-linkus apt-ensure.sh: no service starts while it installs packages\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
