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
# How to run this again once a refused file is fixed (a second boot only says "provisioned").
RETRY="then run \`sudo rm /var/lib/daisee-node/.provisioned\` and reboot"

# `setting FILE KEY`: the value of `KEY = value` in a settings file edited on any computer (a BOM,
# CR line ends, quotes and comments are fine). A key given twice, or a value with a space inside,
# is refused (exit 1, the reason on stdout) rather than guessed at.
setting() {
    python3 - "$1" "$2" <<'PY'
import sys

path, key = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    text = f.read(65536).decode("utf-8", "replace").lstrip("\ufeff")
found = []
for line in text.splitlines():
    name, eq, value = line.split("#", 1)[0].partition("=")
    if eq and name.strip() == key:
        found.append(value.strip().strip("\"'").strip())
name = path.rsplit("/", 1)[-1]
if len(found) > 1:
    print(f"{name}: `{key} =` is given {len(found)} times; keep one")
    sys.exit(1)
if found and any(c.isspace() for c in found[0]):
    print(f"{name}: `{key} = {found[0]}` has a space inside")
    sys.exit(1)
print(found[0] if found else "")
PY
}

if [ -e "$DATA/.provisioned" ]; then
    say "already provisioned; nothing to do"
    exit 0
fi

uid=$(awk -F: '$1 == "daisee" {print $3}' "$ROOT/etc/passwd")
gid=$(awk -F: '$1 == "daisee" {print $4}' "$ROOT/etc/passwd")
[ -n "$uid" ] || { echo "no daisee user: run install-node.sh first" >&2; exit 1; }

# -- node id ---------------------------------------------------------------------------------
node_id=""
id_retry="to change it later, set id = \"…\" under [node] in /etc/daisee-node/config.toml, then run \`sudo daisee-mosquitto-setup\` and \`sudo systemctl restart daisee-node\`"
if [ -f "$BOOT/daisee-node-id.txt" ]; then
    # The first non-blank line, without a BOM, CR or the spaces around it (of a bounded read).
    node_id=$(head -c 256 "$BOOT/daisee-node-id.txt" |
        sed '1s/^\xef\xbb\xbf//; s/\r$//; s/^[[:space:]]*//; s/[[:space:]]*$//' | grep -m1 . || true)
    if [[ "$node_id" =~ [[:space:]] ]]; then
        say "ignoring daisee-node-id.txt: '$node_id' has a space inside; $id_retry"
        node_id=""
    elif [ -n "$node_id" ] && ! [[ "$node_id" =~ ^[a-z0-9][a-z0-9_-]{0,63}$ ]]; then
        say "ignoring daisee-node-id.txt: '$node_id' is not lower-case letters, digits, - and _; $id_retry"
        node_id=""
    fi
fi
# (settings given to install-node.sh are kept in $ETC/community.txt)
for community in "$BOOT/daisee-community.txt" "$ETC/community.txt"; do
    [ -z "$node_id" ] && [ -f "$community" ] || continue
    if ! node_id=$(setting "$community" login); then
        say "ignoring the community login: $node_id; $id_retry"
        node_id=""
    elif [ -n "$node_id" ] && ! [[ "$node_id" =~ ^[a-z0-9][a-z0-9_-]{0,63}$ ]]; then
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
keystore="$DATA/node-key.json"
# A keystore that cannot be read (cut while written by an older version, or a damaged disk) is
# replaced only when its address was never published: a registered key is never silently lost.
if [ -e "$keystore" ] && ! shown=$("$VENV/bin/daisee-node" keys show --keystore "$keystore" 2>&1); then
    if [[ "$shown" != *"is not a keystore"* ]]; then
        say "cannot read the node key: $shown"
        exit 1
    fi
    published=$(cat "$BOOT/daisee-node-address.txt" "$DATA/node-address.json" 2>/dev/null |
        grep -o -m1 '0x[0-9a-fA-F]\{40\}' || true)
    if [ -n "$published" ]; then
        say "the node key $keystore cannot be read, and its address $published was published: restore node-key.json from a backup and reboot (only if $published was never registered: delete node-key.json and daisee-node-address.txt, and reboot)"
        exit 1
    fi
    aside="$keystore.unreadable-$(date +%Y%m%d%H%M%S)"
    mv "$keystore" "$aside"
    say "the node key could not be read and no address was published: moved it to $aside, making a new key"
fi
if [ ! -e "$keystore" ]; then
    "$VENV/bin/daisee-node" keys new --keystore "$keystore" --password-file "$ETC/key.pass" \
        > /dev/null
fi
# The address comes from the keystore itself: a boot cut after the key was made still finds it.
shown=$("$VENV/bin/daisee-node" keys show --keystore "$keystore")
address=$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["address"])' "$shown")
printf '%s\n' "$shown" > "$DATA/node-address.json.tmp"
mv -f "$DATA/node-address.json.tmp" "$DATA/node-address.json"
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
config="$ETC/config.toml"
start_chain=""
role=""
# A file the operator typed must never leave the node's config invalid (the node would not start,
# nor reach its safe state): the section is written with proper quoting, checked by the node
# itself on a copy, and only then put in place (whole, by a rename). A boot cut after that still
# finishes the set-up below on the next boot.
if grep -q '^\[chain_node\]' "$config"; then
    role=$("$VENV/bin/python" -c 'import sys,tomllib
print(tomllib.load(open(sys.argv[1],"rb"))["chain_node"]["role"])' "$config")
elif [ -f "$chain_txt" ]; then
    chain_retry="fix daisee-chain.txt on the boot partition, $RETRY"
    problem=""
    if ! role=$(setting "$chain_txt" role); then
        problem=$role
    elif ! bootnodes=$(setting "$chain_txt" bootnodes); then
        problem=$bootnodes
    elif ! nat=$(setting "$chain_txt" nat); then
        problem=$nat
    elif [ "$role" != signer ] && [ "$role" != follower ]; then
        problem="daisee-chain.txt: role must be signer or follower, not '$role'"
    else
        "$VENV/bin/python" - "$config" "$config.chain-new" "$role" "$bootnodes" "$nat" <<'PY'
import json
import os
import sys

config, new, role, bootnodes, nat = sys.argv[1:]
lines = ["", "[chain_node]", f"role = {json.dumps(role)}"]
nodes = [b.strip() for b in bootnodes.split(",") if b.strip()]
if nodes:
    lines.append(f"bootnodes = [{', '.join(json.dumps(b) for b in nodes)}]")
if nat:
    lines.append(f"nat = {json.dumps(nat)}")
with open(config) as f:
    text = f.read()
st = os.stat(config)
with open(new, "w") as f:
    f.write(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    f.flush()
    os.fsync(f.fileno())
os.chmod(new, st.st_mode & 0o7777)
os.chown(new, st.st_uid, st.st_gid)
PY
        if checked=$("$VENV/bin/daisee-node" check-config "$config.chain-new" 2>&1); then
            mv -f "$config.chain-new" "$config"
            sync "$ETC" 2>/dev/null || true
        else
            # the node's own words, one line: the lines naming chain_node, or else all of them
            why=$(printf '%s\n' "$checked" | grep -v -i '^warning' | grep 'chain_node' ||
                printf '%s\n' "$checked")
            why=$(printf '%s\n' "$why" | sed 's/^[[:space:]]*-[[:space:]]*//' | paste -sd ';' -)
            problem="daisee-chain.txt does not make a valid [chain_node]: $why"
        fi
        rm -f "$config.chain-new"
    fi
    if [ -n "$problem" ]; then
        say "no chain client: $problem; $chain_retry"
        role=""
    fi
fi
if [ -n "$role" ]; then
    install -d -m 0700 -o "$uid" -g "$gid" "$ROOT/var/lib/daisee-chain"
    if [ -f "$BOOT/daisee-genesis.json" ]; then
        # A genesis geth cannot run would only make the chain client restart for ever.
        if bad=$("$VENV/bin/python" -c 'import sys
from pathlib import Path
from daisee_node.ledger.chain_node import genesis_problems
problems = genesis_problems(Path(sys.argv[1]))[1]
print(problems[0] if problems else "")' "$BOOT/daisee-genesis.json") && [ -z "$bad" ]; then
            install -m 0644 "$BOOT/daisee-genesis.json" "$ETC/genesis.json"
        else
            say "chain client not started: daisee-genesis.json is refused: ${bad:-cannot be checked}; fix it on the boot partition, copy it to /etc/daisee-node/genesis.json, then run \`sudo systemctl enable --now daisee-chain\`"
        fi
    fi
    # The identity is made as the chain client's user, in its own data dir (on the booted
    # system only: [chain_node] names /var/lib/daisee-chain, not a folder's copy of it).
    if [ -n "$ROOT" ]; then
        say "chain $role: its identity is made on the node's own first boot"
    elif ids=$(setpriv --reuid="$uid" --regid="$gid" --clear-groups \
        "$VENV/bin/daisee-node" chain-node id -c "$config" 2>&1); then
        [ -d "$BOOT" ] && printf '%s\n' "$ids" > "$BOOT/daisee-chain-id.txt"
        say "chain $role: $(echo "$ids" | tr '\n' ' ')"
        [ -f "$ETC/genesis.json" ] && start_chain=yes
    else
        say "chain client not set up: $ids"
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
