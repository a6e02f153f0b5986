#!/usr/bin/env bash
# Builds qimg and runs its main job on a sample image: make a raw disk with a pattern,
# convert it to qcow2 with qimg, then show info, map and check of the result (and let
# qemu-img confirm the two images hold the same data when it is installed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$root" && cargo build --release -q -p qimg-cli)
qimg="$root/target/release/qimg"
dir="$(mktemp -d "${TMPDIR:-/tmp}/qimg-demo.XXXXXX")"
trap 'rm -rf "$dir"' EXIT
cd "$dir"

# 64 MiB raw disk: a text pattern at 0, random data at 16 MiB, a hole in between.
python3 - <<'PY'
import os
with open("sample.raw", "wb") as f:
    f.truncate(64 << 20)
    f.write(b"qimg demo pattern\n" * 100000)
    f.seek(16 << 20)
    f.write(os.urandom(4 << 20))
PY

echo "== qimg convert -p -O qcow2 -c sample.raw sample.qcow2"
"$qimg" convert -p -O qcow2 -c sample.raw sample.qcow2
echo "== qimg info sample.qcow2"
"$qimg" info sample.qcow2
echo "== qimg map sample.qcow2 --output=json"
"$qimg" map --output=json sample.qcow2
echo "== qimg check sample.qcow2"
"$qimg" check sample.qcow2
echo "== qimg compare sample.raw sample.qcow2"
"$qimg" compare sample.raw sample.qcow2
if command -v qemu-img >/dev/null; then
    echo "== qemu-img check and compare agree"
    qemu-img check -q sample.qcow2 && qemu-img compare sample.raw sample.qcow2
fi
