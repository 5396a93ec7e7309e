#!/usr/bin/env bash
# Installs the system packages that vmsnap's tests and demo need, on Debian 12 and alike:
# QEMU 7.2 (qemu-system-x86_64 and, of the same version, qemu-img and qemu-io), dbus-daemon,
# sqlite3, gdbus (the authorization tests call every method with it as other users), polkitd
# (run on the private test bus), Python's D-Bus and GLib bindings (the example front end), and
# for the systemd tests systemd itself (booted in a container, and systemd-analyze),
# unshare/nsenter (util-linux), kill (procps) and the user bus of systemd --user
# (dbus-user-session). Quick and silent when everything is already there; non-interactive; as root it
# runs apt-get directly, otherwise through `sudo -n` when sudo exists.
#
# Order matters: installing qemu-system-x86 (7.2) removes a newer preinstalled qemu-utils, and
# installing qemu-utils afterwards brings the matching 7.2 tools back.
#
# VMSNAP_DEPS_DRY_RUN=1 prints the apt-get commands instead of running them.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# First version number that `TOOL --version` prints, e.g. 7.2.22.
version_of() {
    "$1" --version 2>/dev/null | head -n1 | sed -nE 's/.*version ([0-9]+(\.[0-9]+)*).*/\1/p'
}

# Prints why an install is needed and succeeds, or fails when nothing is missing.
needs_install() {
    local tool
    for tool in qemu-system-x86_64 qemu-img qemu-io dbus-daemon sqlite3 busctl script gdbus \
        setpriv useradd systemd-analyze unshare nsenter kill; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "install-deps: $tool is missing"
            return 0
        fi
    done
    # The example front end and its test use the system Python's D-Bus and GLib bindings.
    if ! /usr/bin/python3 -c 'import dbus, gi' >/dev/null 2>&1; then
        echo "install-deps: python3-dbus or python3-gi is missing"
        return 0
    fi
    if [ ! -x /usr/lib/polkit-1/polkitd ]; then
        echo "install-deps: polkitd is missing"
        return 0
    fi
    if [ ! -e /usr/lib/systemd/user/dbus.socket ]; then
        echo "install-deps: dbus-user-session is missing"
        return 0
    fi
    local system img
    system=$(version_of qemu-system-x86_64)
    img=$(version_of qemu-img)
    if [ -z "$system" ] || [ "$system" != "$img" ]; then
        echo "install-deps: qemu-img ${img:-?} differs from qemu-system-x86_64 ${system:-?}"
        return 0
    fi
    return 1
}

apt() {
    local cmd=(apt-get "$@")
    if [ "${VMSNAP_DEPS_DRY_RUN:-}" = 1 ]; then
        echo "install-deps: would run: ${cmd[*]}"
        return 0
    fi
    if [ "$(id -u)" -eq 0 ]; then
        "${cmd[@]}"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n DEBIAN_FRONTEND=noninteractive "${cmd[@]}"
    else
        echo "install-deps: not root and no sudo: cannot run ${cmd[*]}" >&2
        exit 1
    fi
}

if needs_install; then
    install=(install -y --no-install-recommends -o Dpkg::Options::=--force-confold)
    apt update
    apt "${install[@]}" qemu-system-x86
    apt "${install[@]}" qemu-utils
    apt "${install[@]}" dbus sqlite3 systemd bsdutils python3-dbus python3-gi \
        libglib2.0-bin util-linux passwd polkitd procps dbus-user-session
fi

for tool in qemu-system-x86_64 qemu-img qemu-io dbus-daemon; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-deps: $tool is still missing after installing packages" >&2
        exit 1
    fi
done
system=$(version_of qemu-system-x86_64)
img=$(version_of qemu-img)
io=$(version_of qemu-io)
if [ "$system" != "$img" ] || [ "$system" != "$io" ]; then
    echo "install-deps: QEMU versions differ: qemu-system-x86_64 $system, qemu-img $img," \
        "qemu-io $io" >&2
    exit 1
fi
echo "install-deps: qemu-system-x86_64 $system, qemu-img $img, qemu-io $io," \
    "$(dbus-daemon --version | head -n1)"
