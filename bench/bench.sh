#!/usr/bin/env bash
# Benchmark: qemu-img vs qimg on the same data in the same run.
#
# Generates (reproducibly, fixed seed) a raw disk of BENCH_SIZE_MIB (default 1536 MiB) made of
# 4 MiB extents cycling through random data, compressible data, written zeros and holes; makes
# a qcow2 copy of it with qemu-img; then times, for each tool:
#   qcow2->raw convert, raw->qcow2 convert, map (json), check, info, commit of a 2-deep
#   chain into its base, safe rebase onto a different backing file
# Each command runs BENCH_RUNS times per tool (interleaved) and the best time is kept (caches
# cannot be dropped here, so both tools see warm caches). Every output is checked: converted
# and changed images must read the same as their source (qemu-img compare), map/check/info
# must print the same text, and the table says so.
# On the development VMs the time of a gigabyte copy is bimodal for both tools (0.2-0.4 s or
# 1.0-1.6 s of mostly system time, depending on whether the kernel must get fresh pages from
# the host after a big file was deleted), which is why the best of several runs is kept.
#
# Environment:
#   QIMG=path         binary to benchmark (default: build crates/qimg-cli in release and use it)
#   QEMU_IMG=path     reference (default: qemu-img from PATH)
#   BENCH_DIR=dir     working directory (default: a new temporary directory, removed at exit)
#   BENCH_SIZE_MIB=N  size of the generated disk in MiB (default 1536, at least 1024 for the
#                     figures to mean something)
#   BENCH_RUNS=N      runs per tool and operation (default 5)
#   BENCH_KEEP=1      keep BENCH_DIR
#   BENCH_ONLY=regex  run only the operations whose names match (e.g. 'flatten|commit')
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
QEMU_IMG="${QEMU_IMG:-qemu-img}"
SIZE_MIB="${BENCH_SIZE_MIB:-1536}"
RUNS="${BENCH_RUNS:-5}"

if [ -z "${QIMG:-}" ]; then
    echo "== building qimg (release)" >&2
    (cd "$root" && CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}" cargo build --release -q -p qimg-cli)
    QIMG="$root/target/release/qimg"
fi
command -v "$QEMU_IMG" >/dev/null || { echo "qemu-img not found" >&2; exit 1; }
[ -x "$QIMG" ] || command -v "$QIMG" >/dev/null || { echo "qimg binary not found: $QIMG" >&2; exit 1; }

if [ -n "${BENCH_DIR:-}" ]; then
    dir="$BENCH_DIR"
    mkdir -p "$dir"
else
    dir="$(mktemp -d "${TMPDIR:-/tmp}/qimg-bench.XXXXXX")"
    if [ -z "${BENCH_KEEP:-}" ]; then
        trap 'rm -rf "$dir"' EXIT
    fi
fi
cd "$dir"

# ---- data ---------------------------------------------------------------------------------
gen_data() {
    python3 - "$1" "$SIZE_MIB" <<'PY'
import random, sys
path, size_mib = sys.argv[1], int(sys.argv[2])
ext = 4 << 20
rng = random.Random(20261122)
# Compressible: text-like lines with varying numbers (deflate ratio ~ 5-10x).
words = [b"qcow2", b"cluster", b"refcount", b"l2-table", b"snapshot", b"bitmap", b"zero",
         b"backing", b"guest", b"host", b"offset", b"extent", b"sector"]
def compressible(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(8)) + b" %08d\n" % rng.randrange(10**8)
    return bytes(out[:n])
with open(path, "wb") as f:
    f.truncate(size_mib << 20)
    for i in range((size_mib << 20) // ext):
        kind = i % 10
        f.seek(i * ext)
        if kind < 4:
            f.write(rng.randbytes(ext))          # 40 % random (incompressible)
        elif kind < 7:
            f.write(compressible(ext))           # 30 % compressible
        elif kind < 8:
            f.write(bytes(ext))                  # 10 % written zeros
        else:
            # 20 % holes, with a 4 KiB write in one of them now and then
            if kind == 9 and i % 3 == 0:
                f.write(rng.randbytes(4096))
PY
}

if [ ! -f data.raw ] || [ "$(stat -c %s data.raw)" != "$((SIZE_MIB << 20))" ]; then
    echo "== generating ${SIZE_MIB} MiB of data in $dir" >&2
    gen_data data.raw
fi
if [ ! -f src.qcow2 ]; then
    "$QEMU_IMG" convert -f raw -O qcow2 data.raw src.qcow2
fi
# A 2-deep chain over src.qcow2: each overlay rewrites a scattered tenth of the disk.
if [ ! -f top.qcow2 ]; then
    "$QEMU_IMG" create -q -f qcow2 -b src.qcow2 -F qcow2 mid.qcow2
    "$QEMU_IMG" create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    for layer in mid top; do
        python3 - "$SIZE_MIB" "$layer" <<'PY' | qemu-io -f qcow2 "$layer.qcow2" >/dev/null
import sys
size_mib, layer = int(sys.argv[1]), sys.argv[2]
step = 10 if layer == "mid" else 7
for mib in range(0, size_mib, step):
    print(f"write -P {mib % 251} {mib << 20} 1M")
PY
    done
fi
# A fragmented image for map/check: 4 KiB clusters, 4 KiB written at every other cluster of
# the first 256 MiB in a shuffled order (host order != guest order: ~64 Ki extents), plus
# zero clusters. Written through one qemu-io process reading commands from stdin.
if [ ! -f frag.qcow2 ]; then
    echo "== generating the fragmented image" >&2
    "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4k frag.qcow2 1G
    python3 - <<'PY' | qemu-io -f qcow2 frag.qcow2 >/dev/null
import random
rng = random.Random(7)
idx = list(range(0, 65536, 2))
rng.shuffle(idx)
for n, i in enumerate(idx):
    if n % 8 == 7:
        print(f"write -z {i * 4096} 4096")
    else:
        print(f"write -P {n % 251} {i * 4096} 4096")
PY
fi

# ---- timing -----------------------------------------------------------------------------
now() { date +%s.%N; }
# Peak resident memory of each run (KiB) when GNU time is installed (Debian package `time`).
if [ -x /usr/bin/time ]; then
    TIMEV="/usr/bin/time -f %M"
else
    TIMEV="env"
fi

# Before each timing: earlier outputs are written back (so their writeback does not land in
# the next timing) and the inputs are read once. The development VMs page out page cache
# that has not been touched for a few seconds, so without this whichever tool runs first
# after a pause reads from disk and the other from memory.
warm() {
    sync
    cat "$dir"/data.raw "$dir"/*.qcow2 "$dir"/chain0/*.qcow2 >/dev/null 2>&1 || true
}

# time_cmd OUTFILE REPEAT CMD... : runs CMD REPEAT times with stdout to OUTFILE, prints the
# elapsed seconds of all repetitions.
time_cmd() {
    local out="$1" repeat="$2"
    shift 2
    local t0 t1 i
    warm
    t0="$(now)"
    for ((i = 0; i < repeat; i++)); do
        if ! $TIMEV -o "$out.rss" "$@" >"$out" 2>"$out.err"; then
            echo "command failed: $*" >&2
            cat "$out.err" >&2
            echo "nan"
            return 0
        fi
    done
    t1="$(now)"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

min() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan") print b; else if (b == "nan" || a + 0 <= b + 0) print a; else print b }'; }

rows=()
# selected NAME: whether BENCH_ONLY (an extended regular expression) lets NAME run.
selected() { [ -z "${BENCH_ONLY:-}" ] || grep -Eq -- "$BENCH_ONLY" <<<"$1"; }
# bench NAME VERIFY REPEAT CMD-TEMPLATE [QEMU-TEMPLATE]: the template uses @BIN@ for the tool
# and @OUT@ for an output file name distinct per tool; short operations are repeated REPEAT
# times per timing. QEMU-TEMPLATE, when given, is what qemu-img runs (e.g. its best -m/-W).
# VERIFY is `stdout` (both tools print the same), `first-line` (the same first line, for
# output that ends with a timing), `luks-same-as:RAW` (a LUKS output opened with $SECRET
# reads as RAW) or `same-as:IMAGE` (every output of both
# tools reads the same as IMAGE, by qemu-img compare). Outputs are checked right after each
# run and removed before the next timing: a gigabyte of the other tool's output left in the
# page cache changes how fast the next run gets memory, and so the figures.
bench() {
    local name="$1" verify="$2" repeat="$3" tmpl="$4" qtmpl="${5:-$4}"
    selected "$name" || return 0
    local best_q=nan best_t=nan r t cmd rss_q=0 rss_t=0 same="same"
    for r in $(seq 1 "$RUNS"); do
        for tool in q t; do
            local bin="$QEMU_IMG" use="$qtmpl"
            if [ "$tool" = t ]; then bin="$QIMG"; use="$tmpl"; fi
            cmd="${use//@BIN@/$bin}"
            cmd="${cmd//@OUT@/out.$tool}"
            rm -f out.q out.t
            # shellcheck disable=SC2086
            t="$(time_cmd "stdout.$tool" "$repeat" $cmd)"
            local rss
            rss="$(tail -1 "stdout.$tool.rss" 2>/dev/null | tr -dc 0-9)"
            rss="${rss:-0}"
            if [ "$tool" = q ]; then
                best_q="$(min "$best_q" "$t")"
                [ "$rss" -gt "$rss_q" ] && rss_q="$rss"
            else
                best_t="$(min "$best_t" "$t")"
                [ "$rss" -gt "$rss_t" ] && rss_t="$rss"
            fi
            case "$verify" in
                same-as:*) "$QEMU_IMG" compare -q "${verify#same-as:}" "out.$tool" || same="DIFFERENT" ;;
                luks-same-as:*)
                    "$QEMU_IMG" compare -q --object "$SECRET" --image-opts \
                        "driver=raw,file.filename=${verify#luks-same-as:}" \
                        "driver=qcow2,file.filename=out.$tool,encrypt.key-secret=s0" || same="DIFFERENT" ;;
            esac
        done
        [ "$verify" = stdout ] && { cmp -s stdout.q stdout.t || same="DIFFERENT"; }
        [ "$verify" = first-line ] && { [ "$(head -1 stdout.q)" = "$(head -1 stdout.t)" ] || same="DIFFERENT"; }
    done
    local ratio
    ratio="$(awk -v q="$best_q" -v t="$best_t" 'BEGIN { if (q == "nan" || t == "nan" || t + 0 == 0) print "n/a"; else printf "%.2f", q / t }')"
    rows+=("$(printf '%-28s %10s %10s %7s %9s %9s  %s' "$name" "$best_q" "$best_t" "$ratio" "$((rss_q / 1024))" "$((rss_t / 1024))" "$same")")
    rm -f out.q out.t
}

# bench_inplace NAME FILE REF PREP CMD-TEMPLATE: for operations that change images in place.
# Before each timing, PREP runs (untimed) in a fresh directory out.q / out.t to lay out the
# images; CMD (with @BIN@) is then timed in that directory, and FILE must then read the same
# as REF (qemu-img compare).
bench_inplace() {
    local name="$1" file="$2" ref="$3" prep="$4" tmpl="$5"
    selected "$name" || return 0
    local best_q=nan best_t=nan r t cmd same="same"
    for r in $(seq 1 "$RUNS"); do
        for tool in q t; do
            local bin="$QEMU_IMG"
            [ "$tool" = t ] && bin="$QIMG"
            rm -rf out.q out.t
            mkdir "out.$tool"
            (cd "out.$tool" && eval "$prep")
            cmd="${tmpl//@BIN@/$bin}"
            # shellcheck disable=SC2086
            t="$(cd "out.$tool" && time_cmd "../stdout.$tool" 1 $cmd)"
            if [ "$tool" = q ]; then best_q="$(min "$best_q" "$t")"; else best_t="$(min "$best_t" "$t")"; fi
            "$QEMU_IMG" compare -q "$ref" "out.$tool/$file" || same="DIFFERENT"
        done
    done
    local ratio
    ratio="$(awk -v q="$best_q" -v t="$best_t" 'BEGIN { if (q == "nan" || t == "nan" || t + 0 == 0) print "n/a"; else printf "%.2f", q / t }')"
    rows+=("$(printf '%-28s %10s %10s %7s %9s %9s  %s' "$name" "$best_q" "$best_t" "$ratio" "-" "-" "$same")")
    rm -rf out.q out.t
}

# Chains for commit and rebase, built once: base = the qcow2 source; mid and top are
# overlays with 1 MiB written every 8 MiB (mid) and 256 KiB every 4 MiB (top), so the
# layers' allocations overlap in part; new.qcow2 (a rebase target) is another overlay of
# the source with 512 KiB written every 16 MiB.
if [ ! -f chain0/top.qcow2 ]; then
    echo "== generating backing chains" >&2
    rm -rf chain0
    mkdir chain0
    cp --sparse=always src.qcow2 chain0/base.qcow2
    (
        cd chain0
        "$QEMU_IMG" create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
        "$QEMU_IMG" create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
        "$QEMU_IMG" create -q -f qcow2 -b "$dir/src.qcow2" -F qcow2 new.qcow2
        "$QEMU_IMG" create -q -f qcow2 -b "$dir/src.qcow2" -F qcow2 rtop.qcow2
        python3 -c "
for i in range(0, $SIZE_MIB, 8): print(f'write -P {i % 251} {i}M 1M')" | qemu-io -f qcow2 mid.qcow2 >/dev/null
        python3 -c "
for i in range(2, $SIZE_MIB, 4): print(f'write -P {(i * 7) % 251} {i}M 256k')" | qemu-io -f qcow2 top.qcow2 >/dev/null
        python3 -c "
for i in range(0, $SIZE_MIB, 16): print(f'write -P {(i * 3) % 251} {i}M 512k')" | qemu-io -f qcow2 new.qcow2 >/dev/null
        python3 -c "
for i in range(1, $SIZE_MIB, 4): print(f'write -P 9 {i}M 64k')" | qemu-io -f qcow2 rtop.qcow2 >/dev/null
    )
fi

echo "== running (each operation ${RUNS}x per tool, best time kept)" >&2
bench "convert qcow2->raw" same-as:src.qcow2 1 "@BIN@ convert -f qcow2 -O raw src.qcow2 @OUT@"
bench "convert raw->qcow2" same-as:data.raw 1 "@BIN@ convert -f raw -O qcow2 data.raw @OUT@"
bench "raw->qcow2 (qemu -m16 -W)" same-as:data.raw 1 "@BIN@ convert -f raw -O qcow2 data.raw @OUT@" \
    "@BIN@ convert -m 16 -W -f raw -O qcow2 data.raw @OUT@"
bench "raw->qcow2 -c zlib" same-as:data.raw 1 "@BIN@ convert -c -f raw -O qcow2 data.raw @OUT@" \
    "@BIN@ convert -m 16 -c -f raw -O qcow2 data.raw @OUT@"
bench "raw->qcow2 -c zstd" same-as:data.raw 1 "@BIN@ convert -c -o compression_type=zstd -f raw -O qcow2 data.raw @OUT@" \
    "@BIN@ convert -m 16 -c -o compression_type=zstd -f raw -O qcow2 data.raw @OUT@"
SECRET="secret,id=s0,data=bench-passphrase"
bench "raw->qcow2 LUKS (aes-xts)" luks-same-as:data.raw 1 \
    "@BIN@ convert --object $SECRET -f raw -O qcow2 -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 data.raw @OUT@" \
    "@BIN@ convert -m 16 -W --object $SECRET -f raw -O qcow2 -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 data.raw @OUT@"
bench "flatten 2-deep chain->raw" same-as:top.qcow2 1 "@BIN@ convert -O raw top.qcow2 @OUT@" \
    "@BIN@ convert -m 16 -W -O raw top.qcow2 @OUT@"
bench "map --output=json" stdout 10 "@BIN@ map -f qcow2 --output=json src.qcow2"
bench "map (fragmented) x3" stdout 3 "@BIN@ map -f qcow2 --output=json frag.qcow2"
bench "check x10" stdout 10 "@BIN@ check -f qcow2 src.qcow2"
bench "check (fragmented) x3" stdout 3 "@BIN@ check -f qcow2 frag.qcow2"
bench "info x20" stdout 20 "@BIN@ info -f qcow2 src.qcow2"
bench "bench: 200k 4k reads" first-line 1 "@BIN@ bench -c 200000 -f qcow2 src.qcow2"
[ -f zero1g.raw ] || truncate -s 1G zero1g.raw
bench_inplace "bench: 100k 4k writes" w.qcow2 "$dir/zero1g.raw" \
    "$QEMU_IMG create -q -f qcow2 w.qcow2 1G" \
    "@BIN@ bench -w -c 100000 -f qcow2 w.qcow2"
bench_inplace "commit -b (2-deep)" base.qcow2 "$dir/chain0/top.qcow2" \
    "cp --sparse=always ../chain0/base.qcow2 ../chain0/mid.qcow2 ../chain0/top.qcow2 ." \
    "@BIN@ commit -q -b base.qcow2 top.qcow2"
bench_inplace "rebase (safe)" rtop.qcow2 "$dir/chain0/rtop.qcow2" \
    "cp ../chain0/rtop.qcow2 ." \
    "@BIN@ rebase -b $dir/chain0/new.qcow2 -F qcow2 rtop.qcow2"

echo
echo "fragmented image: 1 GiB, 4 KiB clusters, $(stat -c %s frag.qcow2) bytes"
echo "data: ${SIZE_MIB} MiB raw (40% random, 30% compressible, 10% zeros, 20% holes); qcow2 source $(stat -c %s src.qcow2) bytes"
echo "qemu-img: $("$QEMU_IMG" --version | head -1)"
echo "qimg:     $QIMG"
echo
printf '%-28s %10s %10s %7s %9s %9s  %s\n' "operation" "qemu-img s" "qimg s" "ratio" "qemu MiB" "qimg MiB" "output"
printf '%-28s %10s %10s %7s %9s %9s  %s\n' "---------" "----------" "------" "-----" "--------" "--------" "------"
for r in "${rows[@]}"; do
    echo "$r"
done
echo
echo "ratio = qemu-img seconds / qimg seconds (above 1: qimg is faster); MiB = peak RSS"
