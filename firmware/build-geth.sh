#!/bin/bash
# Build go-ethereum 1.13.15 (the last release that seals Clique blocks) for a Linux architecture,
# from the Go module proxy, into OUT:
#   firmware/build-geth.sh arm64 /path/to/geth      (the Pi image)
#   firmware/build-geth.sh amd64 /path/to/geth
# Pure Go (CGO_ENABLED=0): no cross C toolchain is needed, and geth falls back to its pure-Go
# secp256k1. Needs Go 1.21 or newer (Debian 12: golang-go from bookworm-backports).
set -euo pipefail
ARCH=${1:?usage: build-geth.sh ARCH OUT}
OUT=${2:?usage: build-geth.sh ARCH OUT}
VERSION=${GETH_VERSION:-1.13.15}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$GO" mod init daisee-build-geth >/dev/null 2>&1
GOFLAGS=-mod=mod "$GO" get "github.com/ethereum/go-ethereum@v$VERSION" >/dev/null 2>&1
# A dependency (fjl/memsize) uses go:linkname, which the linker refuses from Go 1.23 on unless
# told not to check (go-ethereum issue 30100); older linkers do not know the flag.
ldflags="-s -w"
minor=$("$GO" env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if [ "$minor" -ge 23 ]; then ldflags="-checklinkname=0 $ldflags"; fi
mkdir -p "$(dirname "$OUT")"
CGO_ENABLED=0 GOOS=linux GOARCH="$ARCH" GOFLAGS=-mod=mod GOTOOLCHAIN=local \
    "$GO" build -trimpath -ldflags="$ldflags" -o "$OUT.tmp" github.com/ethereum/go-ethereum/cmd/geth
mv "$OUT.tmp" "$OUT"
