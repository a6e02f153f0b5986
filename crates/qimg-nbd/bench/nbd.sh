#!/usr/bin/env bash
# qimg-nbd vs qemu-nbd on the same images, in the same run.
#
#   nbdcopy: sequential read of the whole export to null: (MiB/s)
#   nbdcopy: sequential write of a raw file into an empty qcow2 export (MiB/s)
#   fio (ioengine=nbd): 4k random read / write IOPS at iodepth 16, one connection and
#   four connections (numjobs=4, -e 4 on the server)
#
# Raw image for everything; a qcow2 copy for the read tests; an empty qcow2 (created
# anew for every pass) for the qcow2 write tests, so they measure allocating writes. Prints a table with the
# ratio qimg-nbd / qemu-nbd (higher is better for qimg-nbd).
#
# Env: SIZE (default 512M), RUNTIME seconds per fio test (default 8), KEEP=1 keeps the
# work directory, QIMG_NBD=path skips the cargo build, TLS=1 runs everything over TLS
# (certificates made with openssl; both servers with --tls-creds, clients with nbds://).
set -euo pipefail

SIZE=${SIZE:-512M}
RUNTIME=${RUNTIME:-8}
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$here/../.." && pwd)

for t in qemu-nbd qemu-img nbdcopy fio python3; do
    command -v "$t" >/dev/null || { echo "bench: $t is not installed" >&2; exit 1; }
done

if [[ -z "${QIMG_NBD:-}" ]]; then
    (cd "$root" && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build -q --release -p qimg-nbd)
    QIMG_NBD="$root/target/release/qimg-nbd"
fi

work=$(mktemp -d /tmp/qnbd-bench.XXXXXX)
srv_pid=
cleanup() {
    [[ -n "$srv_pid" ]] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null || true
    [[ "${KEEP:-}" == 1 ]] || rm -rf "$work"
}
trap cleanup EXIT

echo "preparing $SIZE images in $work ..." >&2
head -c "$SIZE" /dev/urandom > "$work/img.raw"
qemu-img convert -f raw -O qcow2 "$work/img.raw" "$work/img.qcow2"
sock="$work/sock"
uri="nbd+unix:///?socket=$sock"
tls_args=()
fio_uri=$uri
if [[ "${TLS:-}" == 1 ]]; then
    command -v openssl >/dev/null || { echo "bench: openssl is not installed" >&2; exit 1; }
    pki="$work/pki"
    mkdir -p "$pki/server" "$pki/client"
    ossl() { openssl "$@" 2>/dev/null; }
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    ossl req -x509 "${ec[@]}" -keyout "$pki/ca-key.pem" -out "$pki/ca-cert.pem" -days 2 \
        -subj "/CN=bench CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    for who in server client; do
        ossl req "${ec[@]}" -keyout "$pki/$who/$who-key.pem" -out "$pki/$who.csr" -subj "/CN=$who"
        printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=%sAuth\n' "$who" >"$pki/$who.ext"
        ossl x509 -req -in "$pki/$who.csr" -CA "$pki/ca-cert.pem" -CAkey "$pki/ca-key.pem" \
            -CAcreateserial -out "$pki/$who/$who-cert.pem" -days 2 -extfile "$pki/$who.ext"
        cp "$pki/ca-cert.pem" "$pki/$who/"
    done
    tls_args=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$pki/server" --tls-creds=tls0)
    uri="nbds+unix:///?socket=$sock&tls-certificates=$pki/client"
    # fio's NBD engine refuses URIs naming local files (tls-certificates), so it cannot
    # present a certificate or check the server's: the servers do not ask for client
    # certificates and fio skips verification. The encryption work is the same.
    tls_args[1]+=",verify-peer=off"
    fio_uri="nbds+unix:///?socket=$sock&tls-verify-peer=false"
fi

start() { # prog fmt image
    rm -f "$sock"
    "$1" -t -e 4 "${tls_args[@]}" -f "$2" -k "$sock" "$3" 2>>"$work/server.log" &
    srv_pid=$!
    for _ in $(seq 200); do [[ -S "$sock" ]] && return 0; sleep 0.05; done
    echo "bench: $1 did not start" >&2; exit 1
}
stop() {
    kill "$srv_pid" 2>/dev/null || true
    wait "$srv_pid" 2>/dev/null || true
    srv_pid=
}

copy_mibs() {
    local t0 t1 bytes best=0 r
    bytes=$(stat -c %s "$work/img.raw")
    # Best of three passes: the first one also pays for warming the server and caches.
    for r in 1 2 3; do
        t0=$(date +%s.%N)
        timeout 300 nbdcopy "$uri" null:
        t1=$(date +%s.%N)
        best=$(python3 -c "print(max($best, $bytes/1048576/($t1-$t0)))")
    done
    python3 -c "print(f'{$best:.0f}')"
}

fresh_qcow2() {
    rm -f "$work/w.qcow2"
    qemu-img create -q -f qcow2 "$work/w.qcow2" "$(stat -c %s "$work/img.raw")"
}

write_mibs() { # prog: best of three copies of the raw file into an empty qcow2 export
    local t0 t1 bytes best=0 r
    bytes=$(stat -c %s "$work/img.raw")
    for r in 1 2 3; do
        fresh_qcow2
        start "$1" qcow2 "$work/w.qcow2"
        t0=$(date +%s.%N)
        # --flush: the copy is done when the data is on disk, not in the server's cache.
        timeout 300 nbdcopy --flush "$work/img.raw" "$uri"
        t1=$(date +%s.%N)
        stop
        best=$(python3 -c "print(max($best, $bytes/1048576/($t1-$t0)))")
    done
    python3 -c "print(f'{$best:.0f}')"
}

fio_iops() { # rw jobs
    timeout $((RUNTIME + 60)) fio --name=b --ioengine=nbd --uri="$fio_uri" --rw="$1" --bs=4k \
        --iodepth=16 --numjobs="$2" --group_reporting --runtime="$RUNTIME" --time_based \
        --size="$SIZE" --output-format=json 2>/dev/null |
        python3 -c '
import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]  # fio prints a banner before the JSON
print("%.0f" % (j["read"]["iops"] + j["write"]["iops"]))'
}

declare -A R
run_suite() { # label prog
    start "$2" raw "$work/img.raw"
    R["$1,copy raw MiB/s"]=$(copy_mibs)
    R["$1,randread 1 conn"]=$(fio_iops randread 1)
    R["$1,randread 4 conn"]=$(fio_iops randread 4)
    R["$1,randwrite 1 conn"]=$(fio_iops randwrite 1)
    R["$1,randwrite 4 conn"]=$(fio_iops randwrite 4)
    stop
    start "$2" qcow2 "$work/img.qcow2"
    R["$1,copy qcow2 MiB/s"]=$(copy_mibs)
    R["$1,qcow2 randread 1 conn"]=$(fio_iops randread 1)
    R["$1,qcow2 randread 4 conn"]=$(fio_iops randread 4)
    stop
    R["$1,copy into qcow2 MiB/s"]=$(write_mibs "$2")
    fresh_qcow2
    start "$2" qcow2 "$work/w.qcow2"
    R["$1,qcow2 randwrite 1 conn"]=$(fio_iops randwrite 1)
    stop
    fresh_qcow2
    start "$2" qcow2 "$work/w.qcow2"
    R["$1,qcow2 randwrite 4 conn"]=$(fio_iops randwrite 4)
    stop
}

echo "running qimg-nbd ..." >&2
run_suite qimg "$QIMG_NBD"
echo "running qemu-nbd ..." >&2
run_suite qemu qemu-nbd

printf '%-24s %12s %12s %8s\n' test qimg-nbd qemu-nbd ratio
for k in "copy raw MiB/s" "randread 1 conn" "randread 4 conn" "randwrite 1 conn" \
    "randwrite 4 conn" "copy qcow2 MiB/s" "qcow2 randread 1 conn" "qcow2 randread 4 conn" \
    "copy into qcow2 MiB/s" "qcow2 randwrite 1 conn" "qcow2 randwrite 4 conn"; do
    a=${R["qimg,$k"]}
    b=${R["qemu,$k"]}
    printf '%-24s %12s %12s %8s\n' "$k" "$a" "$b" \
        "$(python3 -c "print(f'{$a/$b:.2f}' if $b else '-')")"
done
echo "(fio: 4k, iodepth 16, ${RUNTIME}s each; IOPS. image $SIZE; $(nproc) CPUs${TLS:+; over TLS})"
