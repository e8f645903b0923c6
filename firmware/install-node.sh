#!/bin/bash
# Install daisee-node into a root filesystem: the Pi image build runs it in the image's chroot
# (pi-gen stage-daisee); it also works on any Debian machine (ROOT=/).
#
#   sudo ROOT=/ PACKAGE=/path/to/daisee-node firmware/install-node.sh
#
# ROOT       root filesystem to install into (default /)
# PACKAGE    what pip installs: the source tree (default: this script's repository) or a wheel
# PIP_ARGS   extra pip arguments (for example an index)
#
# The community broker this node's mosquitto bridges to (optional; without it the node is
# standalone; an image leaves these out and takes them from its boot partition on first boot,
# see firmware/README.md "Community network"):
# COMMUNITY_HOST            the broker's host name (or address), as its certificate names it
# COMMUNITY_PORT            its TLS port (default 8883)
# COMMUNITY_CA              the community's CA certificate, PEM (default: the system's CAs)
# COMMUNITY_LOGIN           this node's login there: its node id (the default)
# COMMUNITY_PASSWORD_FILE   a file holding this node's password there
#
# It creates the `daisee` system user (groups gpio, i2c, dialout), a venv in
# /opt/daisee-node/venv, /etc/daisee-node/config.toml (kept if present), mosquitto's login-only
# listener, the node's ACL and its bridge (daisee-mosquitto-setup), the service units, and
# enables the first-boot provisioning. It does not make the node key or any password: every
# image is the same, each node gets its secrets on first boot.
set -euo pipefail

ROOT=${ROOT:-/}
ROOT=${ROOT%/}
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGE=${PACKAGE:-$(dirname "$HERE")}
PIP_ARGS=${PIP_ARGS:-}
VENV=/opt/daisee-node/venv

say() { printf 'daisee-node install: %s\n' "$*"; }

# -- user and groups ---------------------------------------------------------------------------
for group in gpio i2c dialout; do
    grep -q "^${group}:" "$ROOT/etc/group" || groupadd --prefix "${ROOT:-/}" --system "$group"
done
if ! grep -q '^daisee:' "$ROOT/etc/passwd"; then
    say "creating the daisee user"
    useradd --prefix "${ROOT:-/}" --system --user-group --home-dir /var/lib/daisee-node \
        --no-create-home --shell /usr/sbin/nologin --groups gpio,i2c,dialout daisee
fi

# -- the package ---------------------------------------------------------------------------------
say "installing the package into $VENV"
python3 -m venv "$ROOT$VENV"
# shellcheck disable=SC2086
"$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$PACKAGE"
install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/usr/local/sbin"
ln -sf "$VENV/bin/daisee-node" "$ROOT/usr/local/bin/daisee-node"
install -m 0755 "$HERE/firstboot.sh" "$ROOT/usr/local/sbin/daisee-firstboot"

# -- config, data ---------------------------------------------------------------------------------
install -d -m 0750 "$ROOT/etc/daisee-node"
if [ ! -e "$ROOT/etc/daisee-node/config.toml" ]; then
    install -m 0640 "$HERE/files/config.toml" "$ROOT/etc/daisee-node/config.toml"
fi
install -d -m 0700 "$ROOT/var/lib/daisee-node"   # household readings: the node's user only
uid=$(awk -F: '$1 == "daisee" {print $3}' "$ROOT/etc/passwd")
gid=$(awk -F: '$1 == "daisee" {print $4}' "$ROOT/etc/passwd")
chown "0:$gid" "$ROOT/etc/daisee-node" "$ROOT/etc/daisee-node/config.toml"
chown "$uid:$gid" "$ROOT/var/lib/daisee-node"

# -- mosquitto: logins only, the node's ACL, the bridge to the community broker --------------------
# The ACL names the node and the bridge logs in as the node: until the first boot names it,
# daisee-mosquitto-setup writes the listener only (and keeps any COMMUNITY_* settings).
share=/usr/local/share/daisee-node/mosquitto
install -d -m 0755 "$ROOT$share" "$ROOT/etc/mosquitto/conf.d" "$ROOT/etc/mosquitto/certs"
for template in mosquitto-daisee.conf mosquitto-daisee.acl mosquitto-bridge.conf \
    community-broker.conf community-broker.acl; do
    install -m 0644 "$HERE/files/$template" "$ROOT$share/$template"
done
install -m 0755 "$HERE/files/mosquitto-setup.py" "$ROOT/usr/local/sbin/daisee-mosquitto-setup"
ROOT="${ROOT:-/}" python3 "$ROOT/usr/local/sbin/daisee-mosquitto-setup" --templates "$ROOT$share"

# -- the Pi's interfaces: I2C for the ADS1115, the UART for RS485 HATs ----------------------------
boot_config="$ROOT/boot/firmware/config.txt"
if [ -f "$boot_config" ]; then
    grep -q '^dtparam=i2c_arm=on' "$boot_config" || echo 'dtparam=i2c_arm=on' >> "$boot_config"
    grep -q '^enable_uart=1' "$boot_config" || echo 'enable_uart=1' >> "$boot_config"
fi

# -- services ------------------------------------------------------------------------------------
install -d -m 0755 "$ROOT/etc/systemd/system"
install -m 0644 "$HERE/../systemd/daisee-node.service" "$ROOT/etc/systemd/system/"
# The chain client's unit: enabled by the first boot when the boot partition gives a chain role.
install -m 0644 "$HERE/../systemd/daisee-chain.service" "$ROOT/etc/systemd/system/"
install -m 0644 "$HERE/files/daisee-firstboot.service" "$ROOT/etc/systemd/system/"
systemctl --root="${ROOT:-/}" enable daisee-firstboot.service >/dev/null 2>&1 ||
    systemctl --root="${ROOT:-/}" enable daisee-firstboot.service
say "done; the first boot provisions the node"
