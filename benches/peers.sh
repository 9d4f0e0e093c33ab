#!/usr/bin/env bash
# ferry against its peers, side by side, on the same disk image, in one run.
#
#   ferry full sync (defaults, none, zstd -1)    ferry target + ferry sync, loopback TCP;
#                                                 "defaults" sets nothing but the required
#                                                 keys (compression "auto", workers = cores)
#   nbdcopy --flush IMG nbd+unix://               into qemu-nbd serving a fresh raw file
#   zstd -1 | socat  →  socat | zstd -d           loopback TCP
#   rsync daemon                                  first copy, then a re-copy after 1% of
#                                                 the 64 KiB blocks changed (ferry: seeded
#                                                 re-sync of the same change)
#
# The image is ferry's own realistic generator (`ferry bench --make-image`): ext4 full
# of real OS files, the rest never written. Every copy is checked with cmp. Files live
# on WORK (tmpfs by default), so the disks are not what is measured. Each path runs
# REPS times, interleaved, and the median is reported: these machines are shared and
# noisy, so read the ratios, not the absolute figures.
#
# usage: benches/peers.sh [SIZE_MiB=1024]
# env:   REPS=3  WORK=/dev/shm/ferry-peers.$$  FERRY=target/release/ferry  KEEP=0
#        (KEEP=1 leaves WORK in place)
# needs: target/release/ferry (cargo build --release -p ferry), qemu-nbd (qemu-utils),
#        nbdcopy (libnbd-bin), zstd, socat, rsync, cmp, ss (iproute2). Installs nothing;
#        a missing peer is reported and skipped.
set -Eeuo pipefail

size_mib=${1:-1024}
reps=${REPS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
ferry=${FERRY:-$root/target/release/ferry}
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
work=${WORK:-$shm/ferry-peers.$$}
size_bytes=$(( size_mib * 1024 * 1024 ))
clk_tck=$(getconf CLK_TCK 2>/dev/null || echo 100)
export FERRY_LOG=warn

# ---------------------------------------------------------------- processes & cleanup
pids=()
kill_tree() { # kill_tree PID: a process we started and everything it started
  local child
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
  if [ "${KEEP:-0}" != 1 ] && [ -n "${work:-}" ] && [ -d "$work" ]; then
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A failed step names itself and the logs to read (once, on the script's own stderr,
# whatever the failing command's redirections); WORK is kept for them.
exec 3>&2
on_error() {
  [ -z "${failed_once:-}" ] || return 0
  failed_once=1
  echo "peers.sh: line $1: '$2' failed (exit $3); logs kept in $work" >&3
  tail -n 5 "$work"/*.log 2>/dev/null | sed 's/^/  /' >&3 || true
  KEEP=1
}
trap 'on_error $LINENO "$BASH_COMMAND" $?' ERR

stop() { # stop PID: end one process we started and reap it
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

die() { echo "peers.sh: $*" >&3; KEEP=1; exit 1; }

# ---------------------------------------------------------------- tools
[ -x "$ferry" ] || die "no ferry binary at $ferry: run 'cargo build --release -p ferry' first (or set FERRY)"
command -v cmp >/dev/null || die "cmp (diffutils) is missing; it verifies every copy"
command -v ss >/dev/null || die "ss (iproute2) is missing; it tells when a listener is up"
missing=()
have() { command -v "$1" >/dev/null 2>&1 || { missing+=("$1 ($2)"); return 1; }; }
run_nbd=1;   have qemu-nbd qemu-utils || run_nbd=0;   have nbdcopy libnbd-bin || run_nbd=0
run_zstd=1;  have zstd zstd || run_zstd=0;            have socat socat || run_zstd=0
run_rsync=1; have rsync rsync || run_rsync=0
timer=/usr/bin/time
[ -x "$timer" ] || { missing+=("/usr/bin/time (time): CPU columns left empty"); timer=""; }
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing (skipped): ${missing[*]}"
fi

# ---------------------------------------------------------------- helpers
now_ns() { date +%s%N; }
mbps() { awk -v b="$size_bytes" -v ns="$1" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'; }
median() { printf '%s\n' "$@" | grep -v '^NA$' | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# cpu_ticks PID: user+system time of a live process and of the children it reaped.
cpu_ticks() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
ticks_to_s() { awk -v t="$1" -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }'; }
# time_s FILE: user+system seconds written by `/usr/bin/time -f "%U %S" -o FILE`.
time_s() { [ -s "$1" ] && awk 'END { printf "%.2f", $1 + $2 }' "$1" || echo "-"; }
add_s() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-") print "-"; else printf "%.2f", a + b }'; }
timed() { # timed FILE CMD...: run CMD, CPU seconds into FILE when /usr/bin/time is there
  local out=$1; shift
  if [ -n "$timer" ]; then "$timer" -f "%U %S" -o "$out" "$@"; else : >"$out"; "$@"; fi
}
json_field() { grep -o "\"$1\":[^,}]*" "$2" | head -n1 | cut -d: -f2 | tr -d '"'; }
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 30000 ))
    [ -n "$(ss -Htln "sport = :$p")" ] || { echo "$p"; return; }
  done
  die "no free TCP port found on loopback"
}
wait_listen() { # wait_listen PORT PID
  for _ in $(seq 1 200); do
    [ -n "$(ss -Htln "sport = :$1")" ] && return 0
    kill -0 "$2" 2>/dev/null || die "the listener for port $1 exited; see $work/*.log"
    sleep 0.05
  done
  die "nothing listens on port $1 after 10 s"
}
verify() { # verify COPY NAME
  cmp -s "$img" "$1" || die "$2: $1 differs from the image"
}

declare -A rate cpu wire
record() { # record KEY MB/s CPU_s WIRE_bytes
  rate[$1]="${rate[$1]:-} $2"
  cpu[$1]="${cpu[$1]:-} $3"
  wire[$1]=$4
}
# A failed ferry sync is a result, not the end of the run: it is shown as NA in its
# round, counted, and its error printed.
record_failure() { # record_failure KEY WHAT
  rate[$1]="${rate[$1]:-} NA"
  echo "  $2 FAILED: $(grep -v '^\s*$' "$work/ferry-sync.log" | tail -n 1)" >&3
}

# ---------------------------------------------------------------- the image
mkdir -p "$work"
img=$work/os.img
echo "building the ${size_mib} MiB image with ferry's generator..."
"$ferry" bench --make-image "$img" --size-mib "$size_mib"
mut=$work/os-changed.img

# ---------------------------------------------------------------- ferry target
ferry_port=$(free_port)
"$ferry" keygen >"$work/ferry.key"
chmod 600 "$work/ferry.key"
cat >"$work/target.toml" <<EOF
[target]
listen = "127.0.0.1:$ferry_port"
psk_file = "$work/ferry.key"
state_dir = "$work/ferry-target-state"
[[disk]]
name = "os"
path = "$work/ferry-replica.img"
EOF
source_toml() { # source_toml FILE COMPRESSION|defaults DISK_PATH
  local compression="compression = \"$2\""
  [ "$2" = defaults ] && compression="# every tuning key at its default"
  cat >"$1" <<EOF
[source]
target = "127.0.0.1:$ferry_port"
psk_file = "$work/ferry.key"
state_dir = "$work/ferry-source-state"
$compression
[[disk]]
name = "os"
path = "$3"
EOF
}
source_toml "$work/source-defaults.toml" defaults "$img"
source_toml "$work/source-none.toml" none "$img"
source_toml "$work/source-zstd.toml" zstd "$img"
source_toml "$work/source-changed.toml" none "$mut"
"$ferry" target --config "$work/target.toml" 2>"$work/ferry-target.log" &
ferry_target=$!
pids+=("$ferry_target")
wait_listen "$ferry_port" "$ferry_target"

ferry_base_ok=0
ferry_full() { # ferry_full defaults|none|zstd
  rm -f "$work/ferry-replica.img" "$work/ferry-target-state/os.replica" "$work/ferry-source-state/os.state"
  local t0 t1 c0 c1
  ferry_base_ok=0
  c0=$(cpu_ticks "$ferry_target")
  t0=$(now_ns)
  if ! timed "$work/time.ferry" "$ferry" sync --config "$work/source-$1.toml" --mode full --json \
    >"$work/ferry-$1.json" 2>>"$work/ferry-sync.log"; then
    record_failure "ferry-$1" "ferry full sync ($1)"
    return 0
  fi
  t1=$(now_ns)
  c1=$(cpu_ticks "$ferry_target")
  verify "$work/ferry-replica.img" "ferry ($1)"
  grep -q '"mode":"full"' "$work/ferry-$1.json" || die "ferry ($1) did not run a full sync: $(cat "$work/ferry-$1.json")"
  record "ferry-$1" "$(mbps $((t1 - t0)))" "$(add_s "$(time_s "$work/time.ferry")" "$(ticks_to_s $((c1 - c0)))")" \
    "$(json_field bytes_sent "$work/ferry-$1.json")"
  ferry_base_ok=1
}

ferry_resync() { # right after a successful ferry_full: the replica holds the image
  local t0 t1 c0 c1
  if [ "$ferry_base_ok" != 1 ]; then
    record_failure ferry-seeded "ferry seeded re-sync (no base: the full sync before it failed)"
    return 0
  fi
  c0=$(cpu_ticks "$ferry_target")
  t0=$(now_ns)
  if ! timed "$work/time.ferry" "$ferry" sync --config "$work/source-changed.toml" --json \
    >"$work/ferry-changed.json" 2>>"$work/ferry-sync.log"; then
    record_failure ferry-seeded "ferry seeded re-sync"
    return 0
  fi
  t1=$(now_ns)
  c1=$(cpu_ticks "$ferry_target")
  cmp -s "$mut" "$work/ferry-replica.img" || die "ferry re-sync: the replica differs from the changed image"
  grep -q '"mode":"seeded"' "$work/ferry-changed.json" || die "ferry re-sync was not seeded: $(cat "$work/ferry-changed.json")"
  record "ferry-seeded" "$(mbps $((t1 - t0)))" "$(add_s "$(time_s "$work/time.ferry")" "$(ticks_to_s $((c1 - c0)))")" \
    "$(json_field bytes_sent "$work/ferry-changed.json")"
}

# ---------------------------------------------------------------- peers
nbd_copy() {
  local out=$work/nbd-out.img sock=$work/nbd.sock server t0 t1 c0 c1
  rm -f "$out" "$sock"
  truncate -s "$size_bytes" "$out"
  qemu-nbd -f raw -t -k "$sock" "$out" 2>"$work/qemu-nbd.log" &
  server=$!
  pids+=("$server")
  for _ in $(seq 1 200); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || die "qemu-nbd did not create $sock; see $work/qemu-nbd.log"
  c0=$(cpu_ticks "$server")
  t0=$(now_ns)
  timed "$work/time.nbdcopy" nbdcopy --flush "$img" "nbd+unix:///?socket=$sock"
  t1=$(now_ns)
  c1=$(cpu_ticks "$server")
  stop "$server"
  verify "$out" "nbdcopy"
  rm -f "$out"
  record nbdcopy "$(mbps $((t1 - t0)))" "$(add_s "$(time_s "$work/time.nbdcopy")" "$(ticks_to_s $((c1 - c0)))")" "-"
}

zstd_socat() {
  local out=$work/zstd-out.img port receiver t0 t1
  port=$(free_port)
  rm -f "$out"
  timed "$work/time.zstd-recv" bash -c \
    "socat -u TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr STDOUT | zstd -d -q -c >'$out'" \
    2>"$work/socat.log" &
  receiver=$!
  pids+=("$receiver")
  wait_listen "$port" "$receiver"
  t0=$(now_ns)
  timed "$work/time.zstd-send" bash -c "zstd -1 -q -c '$img' | socat -u STDIN TCP:127.0.0.1:$port"
  wait "$receiver" || die "the zstd | socat receiver failed; see $work/socat.log"
  t1=$(now_ns)
  verify "$out" "zstd | socat"
  rm -f "$out"
  record zstd "$(mbps $((t1 - t0)))" "$(add_s "$(time_s "$work/time.zstd-send")" "$(time_s "$work/time.zstd-recv")")" \
    "${zstd_wire:--}"
}

rsync_port=""
rsync_daemon=""
rsync_start() {
  rsync_port=$(free_port)
  mkdir -p "$work/rsync-dst"
  cat >"$work/rsyncd.conf" <<EOF
use chroot = no
uid = $(id -u)
gid = $(id -g)
log file = $work/rsyncd.log
[peers]
path = $work/rsync-dst
read only = no
EOF
  rsync --daemon --no-detach --address=127.0.0.1 --port="$rsync_port" --config="$work/rsyncd.conf" &
  rsync_daemon=$!
  pids+=("$rsync_daemon")
  wait_listen "$rsync_port" "$rsync_daemon"
}

rsync_copy() { # rsync_copy SOURCE KEY: --inplace, as ferry updates its replica in place;
               # -I so the re-copy runs the delta algorithm instead of trusting mtimes
  local src=$1 key=$2 t0 t1 c0 c1
  c0=$(cpu_ticks "$rsync_daemon")
  t0=$(now_ns)
  timed "$work/time.rsync" rsync -I --inplace --stats "$src" "rsync://127.0.0.1:$rsync_port/peers/os.img" \
    >"$work/rsync-$key.stats"
  t1=$(now_ns)
  # The daemon forks a child per connection; its CPU shows up once it is reaped.
  sleep 0.3
  c1=$(cpu_ticks "$rsync_daemon")
  cmp -s "$src" "$work/rsync-dst/os.img" || die "rsync ($key): the copy differs from its source"
  record "$key" "$(mbps $((t1 - t0)))" "$(add_s "$(time_s "$work/time.rsync")" "$(ticks_to_s $((c1 - c0)))")" \
    "$(awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); print $2 }' "$work/rsync-$key.stats")"
}

# ---------------------------------------------------------------- run
if [ "$run_zstd" = 1 ]; then
  zstd_wire=$(zstd -1 -q -c "$img" | wc -c)
fi
[ "$run_rsync" = 1 ] && rsync_start

for rep in $(seq 1 "$reps"); do
  echo "round $rep of $reps..."
  ferry_full defaults
  [ "$run_nbd" = 1 ] && nbd_copy
  ferry_full none
  ferry_full zstd
  [ "$run_zstd" = 1 ] && zstd_socat
  if [ "$run_rsync" = 1 ]; then
    rm -f "$work/rsync-dst/os.img"
    rsync_copy "$img" rsync-first
  fi
  # The 1% change, made once per round on a fresh copy so every round sees the same
  # kind of work; ferry's replica and rsync's copy both hold the image before it.
  cp --sparse=always "$img" "$mut"
  "$ferry" bench --mutate-image "$mut" --mutate-percent 1 --seed "$rep" >/dev/null
  ferry_resync
  [ "$run_rsync" = 1 ] && rsync_copy "$mut" rsync-changed
  rm -f "$mut"
done

# ---------------------------------------------------------------- report
med() { median ${rate[$1]:-0}; }
# paired KEY PAIR_KEY: median over rounds of (PAIR's MB/s / KEY's MB/s) in the same
# round. The two ran back to back, so load that drifts over minutes mostly cancels.
paired() {
  awk -v a="${rate[$2]}" -v b="${rate[$1]}" 'BEGIN {
    m = split(a, f, " "); split(b, p, " "); n = 0
    for (i = 1; i <= m; i++) if (f[i] != "NA" && p[i] != "NA") r[++n] = f[i] / p[i]
    if (n == 0) { print "-"; exit }
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
    printf "%.2f", (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
  }'
}
row() { # row KEY LABEL [PAIR_KEY]
  local key=$1 label=$2 pair=${3:-} m ratio="" per_round="" w c="-"
  [ -n "${rate[$key]:-}" ] || { printf '%-36s %7s\n' "$label" "skipped"; return; }
  m=$(med "$key")
  case " ${rate[$key]} " in *" NA "*) label="$label [$(echo ${rate[$key]} | tr ' ' '\n' | grep -c NA) failed]" ;; esac
  if [ -n "$pair" ] && [ -n "${rate[$pair]:-}" ]; then
    ratio=$(awk -v f="$(med "$pair")" -v p="$m" 'BEGIN { printf "%.2f", f / p }')
    per_round=$(paired "$key" "$pair")
  fi
  w=${wire[$key]:--}
  [ "$w" != "-" ] && w=$(awk -v b="$w" 'BEGIN { printf "%.0f", b / 1048576 }')
  [ -n "$timer" ] && c=$(printf '%s\n' ${cpu[$key]} | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
  printf '%-36s %7s  %-28s %6s %8s %10s %9s\n' "$label" "$m" "$(echo ${rate[$key]})" "$c" "$w" "$ratio" "$per_round"
}
echo
echo "ferry vs peers: ${size_mib} MiB image ($(awk -v b="$(du -B1 "$img" | cut -f1)" 'BEGIN { printf "%.0f", b / 1048576 }') MiB allocated), files in $work, $reps round(s)"
echo "MB/s = 10^6 bytes of disk covered per second of wall time (median; all runs listed)"
echo "CPU s = user+system of both ends (median); wire = bytes sent, MiB"
echo "ferry/peer = ratio of the medians; per round = median of the ratios within each round"
printf '%-36s %7s  %-28s %6s %8s %10s %9s\n' "path" "MB/s" "runs" "CPU s" "wire MiB" "ferry/peer" "per round"
row ferry-defaults "ferry full, defaults (auto)"
row nbdcopy "nbdcopy --flush -> qemu-nbd" ferry-defaults
row ferry-none "ferry full, compression none"
row nbdcopy "nbdcopy (vs ferry none)" ferry-none
row ferry-zstd "ferry full, zstd -1"
row zstd "zstd -1 | socat | zstd -d" ferry-zstd
row rsync-first "rsync daemon, first copy" ferry-none
row ferry-seeded "ferry seeded re-sync, 1% changed"
row rsync-changed "rsync daemon re-copy, 1% changed" ferry-seeded
if [ -n "${rate[ferry-defaults]:-}" ] && [ -n "${rate[nbdcopy]:-}" ]; then
  r=$(paired nbdcopy ferry-defaults)
  echo
  echo "summary: loopback full sync ferry-defaults/nbdcopy ${r}x (bar 2.0x) $(awk -v r="$r" 'BEGIN { print (r != "-" && r >= 2.0) ? "PASS" : "FAIL" }') (medians $(med ferry-defaults) / $(med nbdcopy) MB/s)"
fi
