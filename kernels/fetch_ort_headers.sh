#!/bin/sh
# Fetch ONNX Runtime's C/C++ headers (Debian trixie libonnxruntime-dev, ORT 1.21) into a private
# folder, without touching the system's package state (no root needed for apt-get download here).
#
#   kernels/fetch_ort_headers.sh DEST
#
# On success the headers are in DEST/root/usr/include/onnxruntime and that path is printed last.
# The custom-op library built against them reaches ORT only through OrtApiBase, so it loads in
# newer onnxruntime releases (1.32 CPU, onnxruntime-gpu 1.31).
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
T=$1
INC=$T/root/usr/include/onnxruntime
if [ -f "$INC/onnxruntime_lite_custom_op.h" ]; then
    echo "$INC"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "apt-get not found: set ORT_INCLUDE_DIR to a folder holding onnxruntime_c_api.h" >&2; exit 1; }
command -v dpkg-deb >/dev/null 2>&1 || { echo "dpkg-deb not found: set ORT_INCLUDE_DIR instead" >&2; exit 1; }
SRC=/etc/apt/sources.list.d/debian.sources
[ -f "$SRC" ] || { echo "$SRC not found (not a deb822 Debian machine): set ORT_INCLUDE_DIR instead" >&2; exit 1; }
mkdir -p "$T/sp" "$T/lists/partial" "$T/cache/archives/partial"
awk 'BEGIN{RS="";ORS="\n"} NR==1' "$SRC" \
  | sed -e '/^#/d' -e 's/^Suites:.*/Suites: trixie/' > "$T/sp/trixie.sources"
O="-o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts=$T/sp -o Dir::State::Lists=$T/lists \
   -o Dir::Cache=$T/cache -o Dir::State::status=/dev/null"
# shellcheck disable=SC2086
apt-get $O update >&2
# shellcheck disable=SC2086
(cd "$T" && apt-get $O download libonnxruntime-dev >&2)
dpkg-deb -x "$T"/libonnxruntime-dev_*.deb "$T/root"
[ -f "$INC/onnxruntime_lite_custom_op.h" ] || { echo "headers not found under $INC after extraction" >&2; exit 1; }
echo "$INC"
