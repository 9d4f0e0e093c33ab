#!/usr/bin/env bash
# ferry at its shipped defaults against its peers over a shaped link: two network
# namespaces joined by a veth pair whose sending side is limited by a tbf qdisc.
#
#   ferry target (defaults) in the far namespace, ferry sync (defaults: compression
#   "auto", one worker per core) in the near one
#   zstd -1 -T2 | socat  →  socat | zstd -d                  (1 Gbit/s)
#   nbdcopy --flush IMG nbd://FAR  →  qemu-nbd -f raw -t      (1 Gbit/s)
#   zstd -3 -T2 | socat  →  socat | zstd -d                  (100 Mbit/s, for time)
#
# Each round runs every path once, alternately, on the same image (ferry's generator,
# `ferry bench --make-image`); every copy is checked with cmp. The last lines, one per
# bar, start with `summary:`:
#   1 Gbit/s:   ferry ≥ 1.5× zstd -1 -T2 | socat, ferry ≥ 2.5× nbdcopy → qemu-nbd (MB/s
#               of disk covered, median of the per-round ratios)
#   100 Mbit/s: ferry's bytes sent ≤ the size of `zstd -3` of the image
#
# usage: benches/shaped-link.sh
# env:   REPS=2  SIZE_1G_MIB=1024  SIZE_100M_MIB=512  NBD_100M=0 (1: nbdcopy at 100 Mbit/s too)
#        WORK=/dev/shm/ferry-shaped.$$  FERRY=target/release/ferry  KEEP=0
# needs: root, ip and tc (iproute2), zstd, socat, cmp; qemu-nbd and nbdcopy for the
#        nbdcopy rows. Without root or ip/tc it says why and exits 0 (skipped).
set -Eeuo pipefail

reps=${REPS:-2}
size_1g=${SIZE_1G_MIB:-1024}
size_100m=${SIZE_100M_MIB:-512}
nbd_100m=${NBD_100M:-0}
root=$(cd "$(dirname "$0")/.." && pwd)
ferry=${FERRY:-$root/target/release/ferry}
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
work=${WORK:-$shm/ferry-shaped.$$}
export FERRY_LOG=warn

skip() { echo "shaped-link.sh: skipped: $*"; echo "summary: shaped-link skipped: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (network namespaces, veth and tc)"
command -v ip >/dev/null || skip "ip (iproute2) is missing"
command -v tc >/dev/null || skip "tc (iproute2) is missing"
for tool in zstd socat cmp ss; do
  command -v "$tool" >/dev/null || skip "$tool is missing"
done
[ -x "$ferry" ] || { echo "shaped-link.sh: no ferry binary at $ferry: run 'cargo build --release -p ferry' first (or set FERRY)" >&2; exit 1; }
run_nbd=1
command -v qemu-nbd >/dev/null && command -v nbdcopy >/dev/null || { run_nbd=0; echo "qemu-nbd or nbdcopy missing: nbdcopy rows skipped"; }

# ---------------------------------------------------------------- namespaces & cleanup
near=ferry-near-$$
far=ferry-far-$$
near_ip=10.77.$(( $$ % 250 )).1
far_ip=10.77.$(( $$ % 250 )).2
pids=()
kill_tree() { # kill_tree PID: a process we started and everything it started
  local child                # (`ip netns exec` runs its command as a child)
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    kill_tree "$child"
  done
  kill "$1" 2>/dev/null || true
}
cleanup() {
  local pid
  trap - ERR
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill_tree "$pid"
  done
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && { wait "$pid" 2>/dev/null || true; }
  done
  # Deleting a namespace ends what still runs in it only once its processes are gone;
  # every process here was started by us and listed in pids.
  ip netns del "$near" 2>/dev/null || true
  ip netns del "$far" 2>/dev/null || true
  if [ "${KEEP:-0}" != 1 ] && [ -d "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { echo "shaped-link.sh: $*" >&2; KEEP=1; exit 1; }

# shellcheck source=benches/netns.sh
. "$root/benches/netns.sh"
link_up "$near" "$far" "$near_ip" "$far_ip" || skip "cannot create network namespaces and a veth here"
in_near() { ip netns exec "$near" "$@"; }
in_far() { ip netns exec "$far" "$@"; }
shape() { link_shape "$near" "$1"; } # shape RATE: the data direction's limit

# ---------------------------------------------------------------- helpers
now_ns() { date +%s%N; }
wait_port() { # wait_port PORT PID: something listens on PORT in the far namespace
  for _ in $(seq 1 200); do
    in_far ss -Htln "sport = :$1" | grep -q . && return 0
    kill -0 "$2" 2>/dev/null || die "the listener for port $1 exited; see $work/*.log"
    sleep 0.05
  done
  die "nothing listens on port $1 after 10 s"
}
json_field() { grep -o "\"$1\":[^,}]*" "$2" | head -n1 | cut -d: -f2 | tr -d '"'; }
mbps() { awk -v b="$1" -v ns="$2" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'; }
verify() { cmp -s "$img" "$1" || die "$2: $1 differs from the image"; }

declare -A rate
record() { rate[$1]="${rate[$1]:-} $2"; }

# ---------------------------------------------------------------- ferry
port=7410
mkdir -p "$work"
"$ferry" keygen >"$work/ferry.key"
chmod 600 "$work/ferry.key"
cat >"$work/target.toml" <<EOF
[target]
listen = "$far_ip:$port"
psk_file = "$work/ferry.key"
state_dir = "$work/target-state"
[[disk]]
name = "os"
path = "$work/replica.img"
EOF
cat >"$work/source.toml" <<EOF
[source]
target = "$far_ip:$port"
psk_file = "$work/ferry.key"
state_dir = "$work/source-state"
[[disk]]
name = "os"
path = "$work/os.img"
EOF
in_far "$ferry" target --config "$work/target.toml" 2>"$work/ferry-target.log" &
pids+=($!)
wait_port "$port" "${pids[-1]}"

ferry_sent=""
ferry_frames=""
ferry_full() { # ferry_full KEY
  rm -f "$work/replica.img" "$work/target-state/os.replica" "$work/source-state/os.state"
  local t0 t1
  t0=$(now_ns)
  in_near "$ferry" sync --config "$work/source.toml" --mode full --json >"$work/ferry.json" \
    2>>"$work/ferry-sync.log" || die "ferry sync failed: $(tail -n 1 "$work/ferry-sync.log")"
  t1=$(now_ns)
  verify "$work/replica.img" "ferry"
  record "$1" "$(mbps "$size_bytes" $((t1 - t0)))"
  ferry_sent=$(json_field bytes_sent "$work/ferry.json")
  ferry_frames="raw $(json_field frames_raw "$work/ferry.json"), zstd $(grep -o '"frames_zstd":{[^}]*}' "$work/ferry.json" | cut -d: -f2-)"
  echo "  ferry: $(mbps "$size_bytes" $((t1 - t0))) MB/s, $ferry_sent bytes sent, frames $ferry_frames"
}

# ---------------------------------------------------------------- peers
zstd_socat() { # zstd_socat KEY LEVEL
  local out=$work/zstd-out.img p=$((port + 1)) receiver t0 t1
  rm -f "$out"
  in_far bash -c "socat -u TCP-LISTEN:$p,bind=$far_ip,reuseaddr STDOUT | zstd -d -q -c >'$out'" \
    2>"$work/socat.log" &
  receiver=$!
  pids+=("$receiver")
  wait_port "$p" "$receiver"
  t0=$(now_ns)
  in_near bash -c "zstd -$2 -T2 -q -c '$img' | socat -u STDIN TCP:$far_ip:$p"
  wait "$receiver" || die "the zstd | socat receiver failed; see $work/socat.log"
  t1=$(now_ns)
  verify "$out" "zstd -$2 | socat"
  rm -f "$out"
  record "$1" "$(mbps "$size_bytes" $((t1 - t0)))"
  echo "  zstd -$2 -T2 | socat: $(mbps "$size_bytes" $((t1 - t0))) MB/s"
}

nbd_copy() { # nbd_copy KEY
  local out=$work/nbd-out.img p=$((port + 2)) server t0 t1
  rm -f "$out"
  truncate -s "$size_bytes" "$out"
  in_far qemu-nbd -f raw -t -b "$far_ip" -p "$p" "$out" 2>"$work/qemu-nbd.log" &
  server=$!
  pids+=("$server")
  wait_port "$p" "$server"
  t0=$(now_ns)
  in_near nbdcopy --flush "$img" "nbd://$far_ip:$p"
  t1=$(now_ns)
  kill_tree "$server"
  wait "$server" 2>/dev/null || true
  verify "$out" "nbdcopy"
  rm -f "$out"
  record "$1" "$(mbps "$size_bytes" $((t1 - t0)))"
  echo "  nbdcopy -> qemu-nbd: $(mbps "$size_bytes" $((t1 - t0))) MB/s"
}

# ---------------------------------------------------------------- report helpers
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
paired() { # paired A B: median over rounds of A's MB/s / B's MB/s in the same round
  awk -v a="${rate[$1]}" -v b="${rate[$2]}" 'BEGIN {
    n = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= n; i++) r[i] = x[i] / y[i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
    printf "%.2f", (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
  }'
}
summaries=()
bar() { # bar LABEL VALUE OP LIMIT UNIT
  local ok
  ok=$(awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN { print ((op == ">=" && v >= l) || (op == "<=" && v <= l)) ? "PASS" : "FAIL" }')
  summaries+=("summary: $1 $2$5 (bar $3 $4$5) $ok")
}

# ---------------------------------------------------------------- 1 Gbit/s
img=$work/os.img
echo "building the ${size_1g} MiB image with ferry's generator..."
"$ferry" bench --make-image "$img" --size-mib "$size_1g"
size_bytes=$(( size_1g * 1024 * 1024 ))
shape 1gbit
echo "1 Gbit/s, ${size_1g} MiB image, $reps round(s):"
for rep in $(seq 1 "$reps"); do
  echo "round $rep of $reps"
  ferry_full ferry-1g
  zstd_socat zstd1-1g 1
  [ "$run_nbd" = 1 ] && nbd_copy nbd-1g
done
echo "1 Gbit/s medians (MB/s of disk covered): ferry $(median ${rate[ferry-1g]}), zstd -1 -T2 | socat $(median ${rate[zstd1-1g]})$([ "$run_nbd" = 1 ] && echo ", nbdcopy $(median ${rate[nbd-1g]})")"
bar "shaped 1gbit ferry/zstd-socat" "$(paired ferry-1g zstd1-1g)" ">=" 1.5 x
[ "$run_nbd" = 1 ] && bar "shaped 1gbit ferry/nbdcopy" "$(paired ferry-1g nbd-1g)" ">=" 2.5 x

# ---------------------------------------------------------------- 100 Mbit/s
if [ "$size_100m" != "$size_1g" ]; then
  rm -f "$img"
  echo "building the ${size_100m} MiB image with ferry's generator..."
  "$ferry" bench --make-image "$img" --size-mib "$size_100m"
fi
size_bytes=$(( size_100m * 1024 * 1024 ))
zstd3_size=$(zstd -3 -T2 -q -c "$img" | wc -c)
shape 100mbit
echo "100 Mbit/s, ${size_100m} MiB image, $reps round(s); zstd -3 of the image: $zstd3_size bytes"
sent_100m=()
for rep in $(seq 1 "$reps"); do
  echo "round $rep of $reps"
  ferry_full ferry-100m
  sent_100m+=("$ferry_sent")
  zstd_socat zstd3-100m 3
  [ "$run_nbd" = 1 ] && [ "$nbd_100m" = 1 ] && nbd_copy nbd-100m
done
echo "100 Mbit/s medians (MB/s of disk covered): ferry $(median ${rate[ferry-100m]}), zstd -3 -T2 | socat $(median ${rate[zstd3-100m]}); ferry/zstd-3-socat per round $(paired ferry-100m zstd3-100m)"
worst_sent=$(printf '%s\n' "${sent_100m[@]}" | sort -n | tail -n 1)
bar "shaped 100mbit ferry-bytes/zstd-3-bytes" "$(awk -v a="$worst_sent" -v b="$zstd3_size" 'BEGIN { printf "%.3f", a / b }')" "<=" 1.000 x

echo
printf '%s\n' "${summaries[@]}"
