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

# -- the community chain: this node's role, from the boot partition -------------------------------
# daisee-chain.txt (`role = signer|follower`, optional `bootnodes = enode://…,enode://…` and
# `nat = extip:192.168.1.20`) makes this node run the chain client (geth, daisee-chain.service).
# Its identity (enode, and a signer's sealing address) is written to daisee-chain-id.txt for the
# community's genesis or vote. The client starts once daisee-genesis.json is there too (now, or
# later in /etc/daisee-node/genesis.json, then `systemctl enable --now daisee-chain`).
chain_txt="$BOOT/daisee-chain.txt"
start_chain=""
if [ -f "$chain_txt" ] && ! grep -q '^\[chain_node\]' "$ETC/config.toml"; then
    value() { # `key = value` of the chain file (a BOM, CR line ends, quotes and comments are fine)
        sed -n "1s/^\xef\xbb\xbf//; s/#.*//; s/\r//; s/^[[:space:]]*$1[[:space:]]*=//p" \
            "$chain_txt" | head -n1 | tr -d '[:space:]"'"'"
    }
    role=$(value role)
    if [ "$role" = signer ] || [ "$role" = follower ]; then
        bootnodes=$(value bootnodes)
        nat=$(value nat)
        {
            printf '\n[chain_node]\nrole = "%s"\n' "$role"
            [ -z "$bootnodes" ] || printf 'bootnodes = ["%s"]\n' "${bootnodes//,/\", \"}"
            [ -z "$nat" ] || printf 'nat = "%s"\n' "$nat"
        } >> "$ETC/config.toml"
        install -d -m 0700 -o "$uid" -g "$gid" "$ROOT/var/lib/daisee-chain"
        if [ -f "$BOOT/daisee-genesis.json" ]; then
            install -m 0644 "$BOOT/daisee-genesis.json" "$ETC/genesis.json"
        fi
        # The identity is made as the chain client's user, in its own data dir (on the booted
        # system only: [chain_node] names /var/lib/daisee-chain, not a folder's copy of it).
        if [ -n "$ROOT" ]; then
            say "chain $role: its identity is made on the node's own first boot"
        elif ids=$(setpriv --reuid="$uid" --regid="$gid" --clear-groups \
            "$VENV/bin/daisee-node" chain-node id -c "$ETC/config.toml" 2>&1); then
            [ -d "$BOOT" ] && printf '%s\n' "$ids" > "$BOOT/daisee-chain-id.txt"
            say "chain $role: $(echo "$ids" | tr '\n' ' ')"
            [ -f "$ETC/genesis.json" ] && start_chain=yes
        else
            say "chain client not set up: $ids"
        fi
    else
        say "ignoring daisee-chain.txt: role must be signer or follower, not '$role'"
    fi
fi

# -- start ---------------------------------------------------------------------------------------
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    # During boot this unit is ordered before mosquitto and the node: a blocking start or restart
    # of either would wait for this very unit to finish, for ever. So only queue jobs: a running
    # mosquitto (this script run by hand) restarts (a reload would not start a new bridge), and
    # both start once this is done.
    systemctl enable --quiet mosquitto.service daisee-node.service
    systemctl try-restart --no-block mosquitto.service
    systemctl start --no-block mosquitto.service daisee-node.service
    if [ -n "$start_chain" ]; then
        systemctl enable --quiet daisee-chain.service
        systemctl start --no-block daisee-chain.service
    fi
else
    systemctl --root="${ROOT:-/}" enable daisee-node.service >/dev/null 2>&1 ||
        systemctl --root="${ROOT:-/}" enable daisee-node.service
    if [ -n "$start_chain" ]; then
        systemctl --root="${ROOT:-/}" enable daisee-chain.service >/dev/null 2>&1 ||
            systemctl --root="${ROOT:-/}" enable daisee-chain.service
    fi
fi
# Last: a first boot cut short runs again on the next boot (the key, once made, is kept).
touch "$DATA/.provisioned"
say "provisioned; daisee-node enabled"
