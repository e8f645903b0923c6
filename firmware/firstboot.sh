#!/bin/bash
# First boot of a daisee-node image (run once by daisee-firstboot.service, as root):
# the node id, the node key, the MQTT passwords, the node's ACL and its bridge to the community
# broker, then the service is enabled and started.
#
# The node id comes from /boot/firmware/daisee-node-id.txt when the operator wrote one there
# before the first boot (lower-case letters, digits, '-', '_'); else from the `login` of the
# community settings (/boot/firmware/daisee-community.txt, or those given to install-node.sh: the
# community broker knows the node by that name); otherwise node-<machine id>.
# The node's chain address is written to /boot/firmware/daisee-node-address.txt (readable from
# any computer) for the community to register.
#
# ROOT (default /) lets the tests provision a root filesystem in a folder.
set -euo pipefail

ROOT=${ROOT:-/}
ROOT=${ROOT%/}
ETC="$ROOT/etc/daisee-node"
DATA="$ROOT/var/lib/daisee-node"
VENV="$ROOT/opt/daisee-node/venv"
BOOT="$ROOT/boot/firmware"

say() { printf 'daisee-node first boot: %s\n' "$*"; }

if [ -e "$DATA/.provisioned" ]; then
    say "already provisioned; nothing to do"
    exit 0
fi

uid=$(awk -F: '$1 == "daisee" {print $3}' "$ROOT/etc/passwd")
gid=$(awk -F: '$1 == "daisee" {print $4}' "$ROOT/etc/passwd")
[ -n "$uid" ] || { echo "no daisee user: run install-node.sh first" >&2; exit 1; }

# -- node id ---------------------------------------------------------------------------------
node_id=""
if [ -f "$BOOT/daisee-node-id.txt" ]; then
    node_id=$(head -n1 "$BOOT/daisee-node-id.txt" | tr -d '[:space:]')
    if ! [[ "$node_id" =~ ^[a-z0-9][a-z0-9_-]{0,63}$ ]]; then
        say "ignoring daisee-node-id.txt: '$node_id' is not lower-case letters, digits, - and _"
        node_id=""
    fi
fi
# (settings given to install-node.sh are kept in $ETC/community.txt)
for community in "$BOOT/daisee-community.txt" "$ETC/community.txt"; do
    [ -z "$node_id" ] && [ -f "$community" ] || continue
    # `login = …` (a file edited on any computer: a BOM, CR line ends, quotes are fine)
    node_id=$(sed -n '1s/^\xef\xbb\xbf//; s/#.*//; s/^[[:space:]]*login[[:space:]]*=//p' \
        "$community" | head -n1 | tr -d '[:space:]"'"'")
    if [ -n "$node_id" ] && ! [[ "$node_id" =~ ^[a-z0-9][a-z0-9_-]{0,63}$ ]]; then
        say "ignoring the community login '$node_id': not lower-case letters, digits, - and _"
        node_id=""
    fi
done
if [ -z "$node_id" ]; then
    machine=$(tr -dc 'a-f0-9' < "$ROOT/etc/machine-id" 2>/dev/null || true)
    [ -n "$machine" ] || machine=$(od -An -tx1 -N4 /dev/urandom | tr -d ' \n')
    node_id="node-${machine: -6}"
fi
sed -i "s/^id = \"CHANGE-ME\".*/id = \"$node_id\"/" "$ETC/config.toml"
say "node id $node_id"

# -- node key ----------------------------------------------------------------------------------
if [ ! -e "$DATA/node-key.json" ]; then
    "$VENV/bin/daisee-node" keys new --keystore "$DATA/node-key.json" \
        --password-file "$ETC/key.pass" > "$DATA/node-address.json"
fi
address=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["address"])' \
    "$DATA/node-address.json")
chown "$uid:$gid" "$DATA/node-key.json" "$DATA/node-address.json"
chown "0:$gid" "$ETC/key.pass"
chmod 0640 "$ETC/key.pass"
if [ -d "$BOOT" ]; then
    printf '%s\n' "$address" > "$BOOT/daisee-node-address.txt"
fi
say "node address $address"

# -- MQTT logins -------------------------------------------------------------------------------
passwd_file="$ROOT/etc/mosquitto/daisee.passwd"
new_password() { od -An -tx1 -N18 /dev/urandom | tr -d ' \n'; }
node_pw=$(new_password)
ha_pw=$(new_password)
install -m 0600 /dev/null "$passwd_file"
mosquitto_passwd -b "$passwd_file" daisee-node "$node_pw"
mosquitto_passwd -b "$passwd_file" homeassistant "$ha_pw"
if grep -q '^mosquitto:' "$ROOT/etc/passwd"; then
    chown "$(awk -F: '$1 == "mosquitto" {print $3":"$4}' "$ROOT/etc/passwd")" "$passwd_file"
fi
printf '%s\n' "$node_pw" > "$ETC/mqtt.pass"
chown "0:$gid" "$ETC/mqtt.pass"
chmod 0640 "$ETC/mqtt.pass"
# For the operator to give to Home Assistant's MQTT integration (user "homeassistant").
install -m 0600 /dev/null "$ETC/homeassistant-mqtt.pass"
printf '%s\n' "$ha_pw" > "$ETC/homeassistant-mqtt.pass"

# -- the node's ACL and the bridge to the community broker ---------------------------------------
# Settings that cannot work are said here (and in the journal); the node then runs standalone,
# and the operator fixes them and runs `daisee-mosquitto-setup` again.
ROOT="${ROOT:-/}" python3 "$ROOT/usr/local/sbin/daisee-mosquitto-setup" ||
    say "no community bridge: see the line above; the node runs standalone"

# -- start ---------------------------------------------------------------------------------------
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    # During boot this unit is ordered before mosquitto and the node: a blocking start or restart
    # of either would wait for this very unit to finish, for ever. So only queue jobs: a running
    # mosquitto (this script run by hand) restarts (a reload would not start a new bridge), and
    # both start once this is done.
    systemctl enable --quiet mosquitto.service daisee-node.service
    systemctl try-restart --no-block mosquitto.service
    systemctl start --no-block mosquitto.service daisee-node.service
else
    systemctl --root="${ROOT:-/}" enable daisee-node.service >/dev/null 2>&1 ||
        systemctl --root="${ROOT:-/}" enable daisee-node.service
fi
# Last: a first boot cut short runs again on the next boot (the key, once made, is kept).
touch "$DATA/.provisioned"
say "provisioned; daisee-node enabled"
