#!/bin/sh
# add-end-marker.sh FILE...: end each file with the YAML end marker line "...", once.
#
# pam_linkus.yaml and extensions.yaml must end with "..." (written last): a file without it is
# taken as cut short or being written and refused, so an emptied or cut file never loads as
# defaults or as fewer extensions. A file from an older version gets the marker here, on upgrade,
# where nothing else writes it: install.sh and the Debian package's postinst both run this script
# (installed as /usr/share/pam-linkus/add-end-marker.sh). A file that already has the line, a
# symlink (linkusd refuses those anyway) or a missing file is left as it is.
set -eu
for file in "$@"; do
    if [ -f "$file" ] && [ ! -L "$file" ] && ! grep -qx '\.\.\.[[:space:]]*' "$file"; then
        if [ -s "$file" ] && [ -n "$(tail -c 1 "$file")" ]; then
            printf '\n' >> "$file"  # the last line had no newline: the marker gets a line of its own
        fi
        printf '...\n' >> "$file"
    fi
done
