#!/usr/bin/env bash
# RPO under load, at the shipped defaults: a guest (fio's nbd engine) writes through
# `ferry shim` at a set rate while `ferry source` replicates to `ferry target` on
# loopback; the RPO is computed from the engine's own records, not guessed.
#
#   RPO at an instant = now - the start of the newest acknowledged epoch (its point in
#   time is its freeze, which follows the start at once). It peaks just before each
#   acknowledgement: at the acknowledgement of epoch k it is ack(k) - start(k-1). The
#   script reads every `epoch durable on the target` event of `ferry source
#   --log-format json` (timestamp = acknowledgement, `seconds` = duration, so start =
#   ack - seconds) and reports the peaks' p50, p99 and max, and whether the RPO grew
#   from the first half of the run to the second (a replica falling behind).
#
# RATE=0 runs no guest at all: every epoch is idle, and the summary is the cost of an
# idle epoch end to end (the engine's own `seconds`: freeze, Open, Commit, the shim's
# commit), against issue 12's bar of 5 ms.
#
# LINK=100mbit (or any tc rate, e.g. 1gbit) puts the target across a shaped link instead
# of loopback: two network namespaces joined by a veth, the source's side limited by a
# tbf qdisc, as in benches/shaped-link.sh (needs root; skips cleanly without it). The
# shim and fio stay in this namespace (the NBD socket is a Unix socket); the engine runs
# in the near namespace, the target in the far one. COMPRESSIBLE=50 makes fio's data
# that compressible (its `buffer_compress_percentage`); by default fio writes random
# bytes, which no level compresses.
#
# usage: benches/rpo.sh
# env:   RATE=50m (fio rate, bytes/s)  BS=4k  RUNTIME=60 (seconds)  SIZE_MIB=1024
#        INTERVAL_MS=1000 (epoch_interval_ms; the only setting that is not a default)
#        LINK (unset: loopback)  COMPRESSIBLE (unset: fio's random data)
#        SOURCE_EXTRA (lines added to [source], to compare settings; the bars add none)
#        BAR_S (the p99 the last line, `summary: …`, holds the run to; default twice the
#        interval: issue 12's bars are 2 s at 1 s epochs and 1 s at 500 ms epochs)
#        WORK=/dev/shm/ferry-rpo.$$  FERRY=target/release/ferry  KEEP=0
# needs: fio with its nbd engine, python3. Installs nothing.
set -Eeuo pipefail

rate=${RATE:-50m}
bs=${BS:-4k}
runtime=${RUNTIME:-60}
size_mib=${SIZE_MIB:-1024}
interval_ms=${INTERVAL_MS:-1000}
root=$(cd "$(dirname "$0")/.." && pwd)
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
work=${WORK:-$shm/ferry-rpo.$$}
ferry=${FERRY:-$root/target/release/ferry}

link=${LINK:-}
near=ferry-rpo-near-$$
far=ferry-rpo-far-$$
pids=()
kill_tree() { # kill_tree PID: a process we started and everything it started
  local child # (`ip netns exec` may run its command as a child)
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    kill_tree "$child"
  done
  kill "$1" 2>/dev/null || true
}
cleanup() {
  for p in "${pids[@]}"; do kill_tree "$p"; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$link" ]; then
    ip netns del "$near" 2>/dev/null || true
    ip netns del "$far" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" != 1 ] && [ -d "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { echo "rpo.sh: $*" >&2; KEEP=1; exit 1; }

command -v fio >/dev/null || die "fio is missing (apt-get install fio)"
fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine"
command -v python3 >/dev/null || die "python3 is missing"
if [ -z "${FERRY:-}" ]; then
  (cd "$root" && cargo build --release -q --bin ferry) || die "cannot build ferry"
fi

skip() { echo "rpo.sh: skipped: $*"; echo "summary: rpo skipped: $*"; exit 0; }
in_near() { "$@"; }
in_far() { "$@"; }
host=127.0.0.1
if [ -n "$link" ]; then
  [ "$(id -u)" = 0 ] || skip "LINK needs root (network namespaces, veth and tc)"
  command -v ip >/dev/null && command -v tc >/dev/null || skip "LINK needs ip and tc (iproute2)"
  # shellcheck source=benches/netns.sh
  . "$root/benches/netns.sh"
  net=10.78.$(( $$ % 250 ))
  link_up "$near" "$far" "$net.1" "$net.2" || skip "cannot create network namespaces and a veth here"
  link_shape "$near" "$link"
  in_near() { ip netns exec "$near" "$@"; }
  in_far() { ip netns exec "$far" "$@"; }
  host=$net.2
fi

mkdir -p "$work"
"$ferry" keygen --out "$work/ferry.key"
truncate -s "${size_mib}M" "$work/disk.img"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/target.toml" <<EOF
[target]
listen = "$host:$port"
psk_file = "$work/ferry.key"
state_dir = "$work/target-state"
[[disk]]
name = "disk"
path = "$work/replica.img"
EOF
cat > "$work/source.toml" <<EOF
[source]
target = "$host:$port"
psk_file = "$work/ferry.key"
state_dir = "$work/source-state"
epoch_interval_ms = $interval_ms
${SOURCE_EXTRA:-}
[[disk]]
name = "disk"
path = "$work/disk.img"
nbd_socket = "$work/disk.sock"
EOF

in_far "$ferry" target --config "$work/target.toml" 2> "$work/target.log" &
pids+=($!)
"$ferry" shim --config "$work/source.toml" 2> "$work/shim.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/disk.sock" ] && grep -q listening "$work/target.log" && break; sleep 0.1; done
[ -S "$work/disk.sock" ] || die "the shim did not start: $(tail -3 "$work/shim.log")"
in_near "$ferry" sync --config "$work/source.toml" > /dev/null 2> "$work/first-sync.log" \
  || die "first sync failed: $(tail -3 "$work/first-sync.log")"
in_near "$ferry" --log-format json source --config "$work/source.toml" 2> "$work/source.log" &
pids+=($!)
sleep 2

if [ "$rate" = 0 ]; then
  echo "rpo.sh: no guest writes for ${runtime}s; epoch_interval_ms=$interval_ms, everything else at its default"
  sleep "$runtime"
else
echo "rpo.sh: fio randwrite bs=$bs rate=$rate for ${runtime}s through the shim${link:+ over a $link link}${COMPRESSIBLE:+, data ${COMPRESSIBLE}% compressible}; epoch_interval_ms=$interval_ms, everything else at its default"
fio --name=guest --ioengine=nbd --uri="nbd+unix:///disk?socket=$work/disk.sock" \
  ${COMPRESSIBLE:+--buffer_compress_percentage="$COMPRESSIBLE" --refill_buffers} \
  --rw=randwrite --bs="$bs" --iodepth=16 --rate="$rate" --time_based --runtime="$runtime" \
  --size="${size_mib}M" --output-format=terse > "$work/fio.out" 2> "$work/fio.err" \
  || die "fio failed: $(tail -3 "$work/fio.err")"
fi
sleep "$(( (interval_ms * 3 + 999) / 1000 ))"

bar_s=${BAR_S:-$(awk -v i="$interval_ms" 'BEGIN { print 2 * i / 1000 }')}
python3 - "$work/source.log" "$runtime" "$bar_s" "$bs@$rate ${interval_ms}ms ${runtime}s${link:+ $link}" <<'EOF'
import json, sys, datetime
log, runtime, bar, case = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
epochs = []
for line in open(log):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    f = e.get("fields", {})
    if f.get("message") != "epoch durable on the target":
        continue
    ack = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
    secs = float(f["seconds"])
    epochs.append((ack - secs, ack, int(f["bytes_sent"])))
if len(epochs) < 3:
    sys.exit(f"rpo.sh: only {len(epochs)} epochs in {log}")
# Peaks: just before each acknowledgement, the previous epoch's start is the newest
# durable point.
peaks = [epochs[k][1] - epochs[k - 1][0] for k in range(1, len(epochs))]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
half = len(peaks) // 2
first, second = max(peaks[:half] or [0]), max(peaks[half:] or [0])
print(f"RPO over {len(epochs)} epochs: p50 {pct(peaks, 50):.2f} s, p99 {pct(peaks, 99):.2f} s, max {max(peaks):.2f} s; "
      f"worst in the first half {first:.2f} s, second half {second:.2f} s ({'growing' if second > 1.5 * first else 'steady'}); "
      f"epoch duration median {pct([a - s for s, a, _ in epochs], 50):.2f} s, "
      f"sent per epoch median {pct([b for _, _, b in epochs], 50) / 1e6:.1f} MB")
if case.startswith("0@") or "@0 " in case:
    durations = sorted(a - s for s, a, _ in epochs)
    p50, p99 = pct(durations, 50) * 1000, pct(durations, 99) * 1000
    print(f"summary: idle epoch end to end median {p50:.1f}ms (bar 5ms) {'PASS' if p50 < 5 else 'FAIL'} "
          f"(p99 {p99:.1f}ms over {len(epochs)} epochs)")
    sys.exit(0)
growing = second > 1.5 * first
ok = pct(peaks, 99) <= bar and not growing
print(f"summary: rpo {case} p99 {pct(peaks, 99):.2f}s (bar {bar:g}s, not growing) "
      f"{'PASS' if ok else 'FAIL'} (p50 {pct(peaks, 50):.2f}s, max {max(peaks):.2f}s, {'growing' if growing else 'steady'})")
EOF
