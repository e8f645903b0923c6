#!/bin/bash -e
# pi-gen: copy daisee-node's source tree (DAISEE_SRC, set in the pi-gen config) into the image and
# run its installer in the image's chroot. The node's secrets are made on its first boot.
SRC="${DAISEE_SRC:?set DAISEE_SRC to the daisee-node checkout in the pi-gen config}"
install -d "${ROOTFS_DIR}/tmp/daisee-node"
tar -C "${SRC}" --exclude=.git --exclude=.venv --exclude=node_modules -cf - . |
    tar -C "${ROOTFS_DIR}/tmp/daisee-node" -xf -
on_chroot << CHROOT
ROOT=/ PACKAGE=/tmp/daisee-node bash /tmp/daisee-node/firmware/install-node.sh
CHROOT
rm -rf "${ROOTFS_DIR}/tmp/daisee-node"
