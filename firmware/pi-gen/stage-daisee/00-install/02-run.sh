#!/bin/bash -e
# pi-gen: the community chain's client, geth 1.13.15 for arm64, cross-built on the build host
# with Go (pure Go, no cross C toolchain) and cached there between image builds. The node runs
# it as daisee-chain.service when the boot partition gives it a chain role.
SRC="${DAISEE_SRC:?set DAISEE_SRC to the daisee-node checkout in the pi-gen config}"
CACHE="${DAISEE_CACHE:-${HOME}/.cache/daisee-node}/geth-1.13.15-linux-arm64"
if [ ! -x "${CACHE}/geth" ]; then
    bash "${SRC}/firmware/build-geth.sh" arm64 "${CACHE}/geth"
fi
install -D -m 0755 "${CACHE}/geth" "${ROOTFS_DIR}/usr/local/bin/geth"
