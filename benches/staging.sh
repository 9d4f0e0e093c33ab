#!/usr/bin/env bash
# What atomic epochs cost: a staged full rewrite against an unstaged one, side by side.
#
#   staged     `ferry sync --mode full` onto a replica that holds an acknowledged epoch:
#              the target logs every byte it overwrites into the epoch's undo log
#              (read the old bytes, append, fdatasync) before it writes
#   unstaged   the same sync onto the same replica file after the target's record for
#              it was removed: the replica holds no acknowledged epoch, so nothing is
#              logged (no product knob: this is what a first sync onto an existing file
#              does), and the target writes exactly the same bytes
#
# Both runs send the same image (ferry's own generator, `ferry bench --make-image`: ext4
# full of real OS files, the rest never written) over loopback to one running target,
# compression none, shipped defaults otherwise. Each run is checked: the replica equals
# the image (cmp), both applied the same number of bytes, the staged run's undo log holds
# entries and the unstaged run's holds none. Before every run (untimed) the target's
# kept recovery points are removed, so neither run pays for pruning an older one: what
# is measured is the staging itself. Runs alternate (staged first in odd rounds,
# unstaged first in even ones), REPS of each; MB/s is bytes of disk covered per second
# of the sync as `ferry sync --json` reports it (`seconds`; the process's wall time,
# printed beside it, is rounded up by its exit, which waits for the progress thread's
# 200 ms tick). Files live on WORK (tmpfs by default), so the disks are
# not what is measured: every logged byte is a memory copy, close to the worst case.
#
# The staging alone, apart from a session (no network, no source): the ignored test
# `stage_cost` in dataplane/src/writer/undo/tests.rs.
#
# usage: benches/staging.sh [SIZE_MiB=1024]
# env:   REPS=5  WORK=/dev/shm/ferry-staging.$$  KEEP=0 (1 leaves WORK in place)
#        FERRY=path to a ferry binary (unset: `cargo build --release -p ferry` first)
#        FERRY_BEFORE=another ferry binary: each round also runs it as the target (the
#        source stays FERRY), alternating, so two builds compare in one run
#        PERF=FILE: `perf record -g` the target during the staged runs into FILE.N
#        (PERF_ALL=1: the whole machine)
# needs: cmp, ss (iproute2); perf for PERF.
set -Eeuo pipefail

size_mib=${1:-1024}
reps=${REPS:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
work=${WORK:-$shm/ferry-staging.$$}
size_bytes=$(( size_mib * 1024 * 1024 ))
export FERRY_LOG=warn

# ---------------------------------------------------------------- processes & cleanup
pids=()
perf_pid=""
cleanup() {
  local pid
  trap - ERR
  [ -n "$perf_pid" ] && { kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; }
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  done
  if [ "${KEEP:-0}" != 1 ] && [ -n "${work:-}" ] && [ -d "$work" ]; then
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
exec 3>&2
on_error() {
  [ -z "${failed_once:-}" ] || return 0
  failed_once=1
  echo "staging.sh: line $1: '$2' failed (exit $3); logs kept in $work" >&3
  tail -n 5 "$work"/*.log 2>/dev/null | sed 's/^/  /' >&3 || true
  KEEP=1
}
trap 'on_error $LINENO "$BASH_COMMAND" $?' ERR
die() { echo "staging.sh: $*" >&3; KEEP=1; exit 1; }

# ---------------------------------------------------------------- tools
if [ -z "${FERRY:-}" ]; then
  echo "building the release binary..."
  (cd "$root" && cargo build --release -p ferry --quiet)
  tdir=${CARGO_TARGET_DIR:-$root/target}
  case "$tdir" in /*) ;; *) tdir=$root/$tdir ;; esac
  ferry=$tdir/release/ferry
else
  ferry=$FERRY
fi
[ -x "$ferry" ] || die "no ferry binary at $ferry"
command -v cmp >/dev/null || die "cmp (diffutils) is missing; it verifies every copy"
command -v ss >/dev/null || die "ss (iproute2) is missing; it tells when a listener is up"
if [ -n "${PERF:-}" ]; then
  command -v perf >/dev/null || die "PERF is set but perf is missing"
fi

# ---------------------------------------------------------------- helpers
now_ns() { date +%s%N; }
mbps() { awk -v b="$size_bytes" -v ns="$1" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
clk_tck=$(getconf CLK_TCK 2>/dev/null || echo 100)
# cpu_ticks PID: user+system time of a live process (all its threads).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# timed FILE CMD...: run CMD, its user+system seconds into FILE (when /usr/bin/time is there)
timed() {
  local out=$1; shift
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "%U %S" -o "$out" "$@"; else : >"$out"; "$@"; fi
}
time_s() { [ -s "$1" ] && awk 'END { printf "%.2f", $1 + $2 }' "$1" || echo "-"; }
json_field() { grep -o "\"$1\":[^,}]*" "$2" | head -n1 | cut -d: -f2 | tr -d '" '; }
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
    kill -0 "$2" 2>/dev/null || die "the target exited; see $work/target.log"
    sleep 0.05
  done
  die "nothing listens on port $1 after 10 s"
}

# ---------------------------------------------------------------- image and target
mkdir -p "$work"
img=$work/os.img
replica=$work/replica.img
tstate=$work/target-state
echo "building the ${size_mib} MiB image with ferry's generator..."
"$ferry" bench --make-image "$img" --size-mib "$size_mib"
port=$(free_port)
"$ferry" keygen >"$work/ferry.key"
chmod 600 "$work/ferry.key"
cat >"$work/target.toml" <<EOF
[target]
listen = "127.0.0.1:$port"
psk_file = "$work/ferry.key"
state_dir = "$tstate"
[[disk]]
name = "os"
path = "$replica"
EOF
cat >"$work/source.toml" <<EOF
[source]
target = "127.0.0.1:$port"
psk_file = "$work/ferry.key"
state_dir = "$work/source-state"
compression = "none"
[[disk]]
name = "os"
path = "$img"
EOF
target=""
start_target() { # start_target BINARY: (re)starts the target with BINARY
  if [ -n "$target" ]; then
    kill "$target" 2>/dev/null || true
    wait "$target" 2>/dev/null || true
  fi
  "$1" target --config "$work/target.toml" 2>>"$work/target.log" &
  target=$!
  pids+=("$target")
  wait_listen "$port" "$target"
}

# undo_bytes: bytes of undo-log entries the last run kept (its log, now a point).
undo_bytes() {
  local meta
  meta=$(ls "$tstate/points/"*.json 2>/dev/null | tail -n 1 || true)
  [ -n "$meta" ] || { echo 0; return; }
  json_field undo_bytes "$meta"
}

# sync_full KIND: one timed full sync; sets rate (MB/s), applied and logged (bytes).
# KIND: staged | unstaged | seed.
sync_full() {
  local kind=$1 t0 t1 c0 c1 out=$work/sync-$1.json
  rm -f "$tstate/points/"*
  [ "$kind" = unstaged ] && rm -f "$tstate/os.replica"
  if [ "$kind" = staged ] && [ -n "${PERF:-}" ]; then
    perf_n=$((perf_n + 1))
    # shellcheck disable=SC2046 # PERF_ALL=1: the whole machine, not only the target
    perf record -g -q -o "$PERF.$perf_n" $([ "${PERF_ALL:-0}" = 1 ] && echo -a || echo -p "$target") \
      2>>"$work/perf.log" &
    perf_pid=$!
    sleep 0.5
  fi
  c0=$(cpu_ticks "$target")
  t0=$(now_ns)
  timed "$work/time.sync" "$ferry" sync --config "$work/source.toml" --mode full --json >"$out" \
    2>>"$work/sync.log" || die "$kind sync failed: $(tail -n 1 "$work/sync.log")"
  t1=$(now_ns)
  c1=$(cpu_ticks "$target")
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid"; wait "$perf_pid" || true; perf_pid=""
  fi
  cmp -s "$img" "$replica" || die "$kind: the replica differs from the image"
  grep -q '"mode":"full"' "$out" || die "$kind did not run a full sync: $(cat "$out")"
  applied=$(json_field bytes_applied "$out")
  logged=$(undo_bytes)
  case $kind in
    staged) [ "$logged" -gt 0 ] || die "staged: the undo log holds no entry" ;;
    unstaged) [ "$logged" -eq 0 ] || die "unstaged: $logged bytes were logged" ;;
  esac
  # The sync's own seconds (from its JSON): the wall time of the process also holds
  # its start and its exit, which waits for the progress thread's next 200 ms tick.
  secs=$(json_field seconds "$out")
  rate=$(awk -v b="$size_bytes" -v s="$secs" 'BEGIN { printf "%.0f", b / s / 1e6 }')
  wall=$(mbps $((t1 - t0)))
  cpu_t=$(awk -v t=$((c1 - c0)) -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }')
  cpu_s=$(time_s "$work/time.sync")
  [ "$kind" = seed ] || echo "  $kind: $rate MB/s (wall $wall), CPU s target $cpu_t source $cpu_s, $applied bytes applied, $logged bytes logged"
}

perf_n=0
start_target "$ferry"
sync_full seed
seed_applied=$applied
declare -A runs_s runs_u runs_r cpu_s cpu_u
# one_round VARIANT BINARY REP: a staged and an unstaged run with BINARY as the target.
one_round() {
  local v=$1 s u sa ua
  [ -z "$before" ] || start_target "$2"
  if (( $3 % 2 )); then
    sync_full staged; s=$rate; sa=$applied; cpu_s[$v]="${cpu_s[$v]:-} $cpu_t"
    sync_full unstaged; u=$rate; ua=$applied; cpu_u[$v]="${cpu_u[$v]:-} $cpu_t"
  else
    sync_full unstaged; u=$rate; ua=$applied; cpu_u[$v]="${cpu_u[$v]:-} $cpu_t"
    sync_full staged; s=$rate; sa=$applied; cpu_s[$v]="${cpu_s[$v]:-} $cpu_t"
  fi
  [ "$sa" = "$ua" ] || die "round $3 ($v): staged applied $sa bytes, unstaged $ua"
  runs_s[$v]="${runs_s[$v]:-} $s"
  runs_u[$v]="${runs_u[$v]:-} $u"
  runs_r[$v]="${runs_r[$v]:-} $(awk -v s="$s" -v u="$u" 'BEGIN { printf "%.3f", s / u }')"
}
before=${FERRY_BEFORE:-}
for rep in $(seq 1 "$reps"); do
  echo "round $rep of $reps..."
  if [ -z "$before" ]; then
    one_round after "$ferry" "$rep"
  elif (( rep % 2 )); then
    echo " before ($before):"; one_round before "$before" "$rep"
    echo " after ($ferry):"; one_round after "$ferry" "$rep"
  else
    echo " after ($ferry):"; one_round after "$ferry" "$rep"
    echo " before ($before):"; one_round before "$before" "$rep"
  fi
done

# ---------------------------------------------------------------- report
echo
echo "staging cost: full rewrite of a ${size_mib} MiB image ($(du -m "$img" | cut -f1) MiB allocated, $applied bytes applied per run, first sync applied ${seed_applied}), files in $work"
printf '%-18s %8s  %s\n' "run" "MB/s" "runs (MB/s of disk covered)"
report() { # report VARIANT LABEL: prints the variant's rows; sets mr (median ratio)
  local ms mu
  # shellcheck disable=SC2086 # word splitting wanted: the runs are space-separated
  ms=$(median ${runs_s[$1]}); mu=$(median ${runs_u[$1]}); mr=$(median ${runs_r[$1]})
  printf '%-18s %8s  %s\n' "$2staged" "$ms" "${runs_s[$1]# }"
  printf '%-18s %8s  %s\n' "$2unstaged" "$mu" "${runs_u[$1]# }"
  echo "$2per-round staged/unstaged:${runs_r[$1]} (median $mr; ratio of medians $(awk -v s="$ms" -v u="$mu" 'BEGIN { printf "%.2f", s / u }'))"
  # shellcheck disable=SC2086
  echo "$2target CPU s (median): staged $(median ${cpu_s[$1]}), unstaged $(median ${cpu_u[$1]})"
}
if [ -n "$before" ]; then
  report before "before: "
  mr_before=$mr
  report after "after: "
  echo "before/after staged/unstaged (same run): ${mr_before}x -> ${mr}x"
else
  report after ""
fi
verdict=$(awk -v r="$mr" 'BEGIN { print (r >= 0.8) ? "PASS" : "FAIL" }')
printf 'summary: staging staged/unstaged %.2fx (bar 0.8x) %s\n' "$mr" "$verdict"
