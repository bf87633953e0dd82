#!/usr/bin/env bash
# Build libcoap's coap-client with OSCORE, installed as `coap-client-oscore`, for the interop
# test tests/secure/test_provisioned.py (Debian bookworm's libcoap3-bin 4.3.1 has no OSCORE).
#
#   scripts/build-libcoap-oscore.sh [SOURCE_DIR_OR_TARBALL] [INSTALL_DIR]
#
# SOURCE: a libcoap v4.3.5 source tree or tarball (default: download the v4.3.5 release from
# GitHub). INSTALL_DIR: where `coap-client-oscore` goes (default /usr/local/bin).
# Needs cmake, gcc, make and libssl-dev. DTLS must stay on: libcoap takes OSCORE's AES-CCM and
# HKDF from its TLS library, and with DTLS off its client says "OSCORE support not enabled".
set -euo pipefail
SOURCE=${1:-https://github.com/obgm/libcoap/archive/refs/tags/v4.3.5.tar.gz}
INSTALL_DIR=${2:-/usr/local/bin}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ -d "$SOURCE" ]; then
    SRC=$SOURCE
else
    case "$SOURCE" in
        http*) curl -fsSL "$SOURCE" -o "$WORK/libcoap.tar.gz"; SOURCE=$WORK/libcoap.tar.gz ;;
    esac
    mkdir "$WORK/src"
    tar -xzf "$SOURCE" -C "$WORK/src"
    # GitHub's tarballs hold one top directory; a `git archive` may hold none.
    SRC=$WORK/src
    [ -f "$SRC/CMakeLists.txt" ] || SRC=$(dirname "$(ls "$WORK"/src/*/CMakeLists.txt)")
fi

cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$WORK/prefix" \
    -DENABLE_OSCORE=ON -DENABLE_DTLS=ON -DDTLS_BACKEND=openssl \
    -DENABLE_DOCS=OFF -DENABLE_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$WORK/build" -j"$(nproc)" >/dev/null
cmake --install "$WORK/build" >/dev/null
# It prints its banner (and "Have OSCORE") on usage, exiting 1.
{ "$WORK/prefix/bin/coap-client" 2>&1 || true; } | grep -q "Have OSCORE"
install -m 0755 "$WORK/prefix/bin/coap-client" "$INSTALL_DIR/coap-client-oscore"
echo "installed $INSTALL_DIR/coap-client-oscore"
