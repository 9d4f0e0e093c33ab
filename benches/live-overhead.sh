#!/usr/bin/env bash
# What continuous replication costs the guest, and how long freezes hold its writes.
#
# One tmpfs-backed raw image served by `ferry shim` (tracking on), a `ferry target` on
# loopback, and fio's nbd engine as the guest. Each repetition runs the same fio job
# twice, interleaved: once with no engine running (tracking only), once while
# `ferry source` takes an epoch every INTERVAL_MS. It reports guest IOPS (4k random
# write, QD32) and 1 MiB sequential write throughput both ways, their ratio, the
# epochs acknowledged during the loaded run, and the freeze pauses the shim measured
# (count, mean, max from its control socket).
#
# The machine is shared and noisy, and engine, shim and fio share its cores: read the
# ratios, not the absolute figures.
#
# usage: benches/live-overhead.sh [SIZE_MiB=1024]
# env:   REPS=3 RUNTIME=15 INTERVAL_MS=1000 WORK=/dev/shm/ferry-live.$$
#        FERRY=target/release/ferry KEEP=0
# needs: target/release/ferry (cargo build --release -p ferry), fio with the nbd
#        engine, socat. Installs nothing.
set -Eeuo pipefail

size_mib=${1:-1024}
reps=${REPS:-3}
runtime=${RUNTIME:-15}
interval=${INTERVAL_MS:-1000}
root=$(cd "$(dirname "$0")/.." && pwd)
ferry=${FERRY:-$root/target/release/ferry}
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
work=${WORK:-$shm/ferry-live.$$}
export FERRY_LOG=${FERRY_LOG:-warn}

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && { wait "$pid" 2>/dev/null || true; }; done
  if [ "${KEEP:-0}" != 1 ] && [ -d "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in fio socat; do
  command -v "$tool" >/dev/null || { echo "live-overhead: $tool is missing" >&2; exit 2; }
done
[ -x "$ferry" ] || { echo "live-overhead: build first: cargo build --release -p ferry" >&2; exit 2; }

mkdir -p "$work"
img=$work/vm1.img
replica=$work/vm1.replica
sock=$work/vm1.sock
state=$work/source-state
"$ferry" keygen --out "$work/ferry.key" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Allocated, non-zero image: the guest overwrites real data.
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$img"
cat >"$work/target.toml" <<EOF
[target]
listen = "127.0.0.1:$port"
psk_file = "$work/ferry.key"
state_dir = "$work/target-state"
retention_points = 4

[[disk]]
name = "vm1"
path = "$replica"
EOF
cat >"$work/source.toml" <<EOF
[source]
target = "127.0.0.1:$port"
psk_file = "$work/ferry.key"
state_dir = "$state"
compression = "none"
epoch_interval_ms = $interval

[[disk]]
name = "vm1"
path = "$img"
nbd_socket = "$sock"
EOF

"$ferry" target --config "$work/target.toml" 2>"$work/target.log" &
pids+=($!)
"$ferry" shim --config "$work/source.toml" 2>"$work/shim.log" &
pids+=($!)
for _ in $(seq 100); do
  [ -S "$state/shim.ctl" ] && socat -u OPEN:/dev/null UNIX-CONNECT:"$state/shim.ctl" 2>/dev/null && break
  sleep 0.1
done
# The first epoch copies the whole image; measurements start from a caught-up replica.
"$ferry" sync --config "$work/source.toml" >/dev/null

status() { echo status | socat - UNIX-CONNECT:"$state/shim.ctl"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

fio_run() { # fio_run NAME RW BS DEPTH -> prints IOPS and MB/s
  fio --name="$1" --ioengine=nbd --uri="nbd+unix:///vm1?socket=$sock" \
    --rw="$2" --bs="$3" --iodepth="$4" --size="${size_mib}M" --runtime="$runtime" \
    --time_based --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | # fio's nbd engine prints a line before the JSON
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.1f" % (j["iops"], j["bw_bytes"]/1e6))'
}

declare -A res
for rep in $(seq "$reps"); do
  for job in "rand4k randwrite 4k 32" "seq1m write 1m 8"; do
    set -- $job
    name=$1
    # Without the engine: tracking (write-intent) only.
    read -r iops mbs < <(fio_run "$name" "$2" "$3" "$4")
    res[$name,off]+="$iops/$mbs "
    off_now="$iops/$mbs"
    # With continuous replication.
    before=$(status | json 'd["pauses"]["count"]')
    "$ferry" source --config "$work/source.toml" 2>>"$work/source.log" &
    src=$!
    read -r iops mbs < <(fio_run "$name" "$2" "$3" "$4")
    kill -TERM "$src"; wait "$src" || true
    st=$(status)
    count=$(echo "$st" | json 'd["pauses"]["count"]')
    res[$name,on]+="$iops/$mbs "
    res[$name,epochs]+="$((count - before)) "
    res[$name,pause]+="$(echo "$st" | json 'd["pauses"]["max_us"]') "
    res[$name,mean]+="$(echo "$st" | json 'round(d["pauses"]["total_us"]/max(1,d["pauses"]["count"]))') "
    echo "rep $rep $name: IOPS/MBps tracking only $off_now, with ferry source ${iops}/${mbs}" >&2
  done
done
# Catch up and verify the replica once.
"$ferry" sync --config "$work/source.toml" >/dev/null
cmp "$img" "$replica" && echo "replica verified identical to the image"

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "live-overhead: ${size_mib} MiB image on tmpfs, ${runtime}s per run, epoch every ${interval} ms, $reps reps (median)"
for name in rand4k seq1m; do
  off_iops=$(echo "${res[$name,off]}" | tr ' ' '\n' | cut -d/ -f1 | tr '\n' ' ' | median)
  on_iops=$(echo "${res[$name,on]}" | tr ' ' '\n' | cut -d/ -f1 | tr '\n' ' ' | median)
  off_mbs=$(echo "${res[$name,off]}" | tr ' ' '\n' | cut -d/ -f2 | tr '\n' ' ' | median)
  on_mbs=$(echo "${res[$name,on]}" | tr ' ' '\n' | cut -d/ -f2 | tr '\n' ' ' | median)
  printf '  %-7s tracking only: %8s IOPS %8s MB/s | with ferry source: %8s IOPS %8s MB/s | ratio %.2f | epochs/run: %s | freeze pause max µs: %s (mean of pauses, µs: %s)\n' \
    "$name" "$off_iops" "$off_mbs" "$on_iops" "$on_mbs" "$(python3 -c "print($on_iops/$off_iops)")" \
    "${res[$name,epochs]}" "${res[$name,pause]}" "${res[$name,mean]}"
done
