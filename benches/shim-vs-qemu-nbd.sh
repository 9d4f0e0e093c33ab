#!/usr/bin/env bash
# The filter shim (change tracking on) against qemu-nbd (no tracking), side by side,
# on the same raw file, with the same fio jobs, in one run.
#
#   ferry shim   filter-driver-shim-test --disk name=bench,path=IMG,...,block_size=64 KiB:
#                the code `ferry shim` runs (Shim::start), write-intent tracking on,
#                its bitmap and state in a fresh STATE_DIR for every job
#   qemu-nbd     qemu-nbd -f raw -t -k SOCK IMG (write-back page cache, its default)
#   shim-repl    (WITH_REPL=1) `ferry shim` on the same file with `ferry source`
#                replicating it continuously to a `ferry target` on loopback, every
#                setting at its default (an epoch every 5 s): the guest's cost of
#                tracking plus freezes and copy-before-write
#   direct       (WITH_DIRECT=1) fio's io_uring engine on IMG itself, no NBD, no server:
#                the physical limit of this path on this machine
#
#   fio --ioengine=nbd --uri='nbd+unix:///?socket=SOCK' against each (direct: the file),
#   one job at a time, a fresh server for every job:
#     randwrite  4 KiB random writes, queue depth RAND_QD (32): IOPS
#     seqwrite   1 MiB sequential writes, queue depth SEQ_QD (8): MiB/s
#
# IMG is one SIZE_MIB file on tmpfs (fully allocated first, so neither server pays
# for allocating pages the other found allocated), so no disk is measured. Each
# (server, job) pair runs REPS times; the order of the two servers alternates from one
# round to the next. The table gives every run, the medians and the ratio of the
# medians shim / qemu-nbd. The server's CPU time per run (user+system from
# /proc/PID/stat) is shown too: on 2 vCPUs fio and the server compete for the same
# cores. These machines are shared and noisy: read the ratios, not the figures.
#
# SHIM_ENGINES="uring sync" runs the shim once per named backing engine (its
# --io-engine), as servers shim-uring, shim-sync, ..., beside qemu-nbd in the same
# rounds (the order rotates from round to round), and adds a table comparing them.
#
# The last lines, `summary: …`, give each ratio the issue 12 bars ask for (shim and
# shim-repl ≥ 2× qemu-nbd; and their fraction of direct).
#
# usage: benches/shim-vs-qemu-nbd.sh
# env:   REPS=3  RUNTIME=10 (seconds per fio job)  SIZE_MIB=1024  RAND_QD=32  SEQ_QD=8
#        SHIM_ENGINES= (empty: one shim, its default engine)
#        WITH_REPL=0 WITH_DIRECT=0 (1: add the shim-repl / direct rows)
#        FERRY=target/release/ferry (for shim-repl)
#        WORK=/dev/shm/ferry-shim-bench.$$  STATE_DIR=$WORK/state (put it on real
#        storage to include bitmap fdatasync costs; tmpfs makes them free)
#        SHIM=target/release/filter-driver-shim-test (built with `cargo build --release -p
#        filter-driver-shim --bin filter-driver-shim-test` when missing or older than the shim's sources,
#        unless SHIM is given)  KEEP=0 (KEEP=1 leaves WORK in place)
# needs: fio with its nbd engine, qemu-nbd (qemu-utils), socat (optional: checks the
#        shim's status after each run). Installs nothing.
set -Eeuo pipefail

reps=${REPS:-3}
runtime=${RUNTIME:-10}
size_mib=${SIZE_MIB:-1024}
rand_qd=${RAND_QD:-32}
seq_qd=${SEQ_QD:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
work=${WORK:-$shm/ferry-shim-bench.$$}
state_dir=${STATE_DIR:-$work/state}
clk_tck=$(getconf CLK_TCK 2>/dev/null || echo 100)

# ---------------------------------------------------------------- processes & cleanup
server=""
helpers=()
cleanup() {
  trap - ERR
  for p in $server "${helpers[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
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
  echo "shim-vs-qemu-nbd.sh: line $1: '$2' failed (exit $3); logs kept in $work" >&3
  tail -n 5 "$work"/*.log 2>/dev/null | sed 's/^/  /' >&3 || true
  KEEP=1
}
trap 'on_error $LINENO "$BASH_COMMAND" $?' ERR
die() { echo "shim-vs-qemu-nbd.sh: $*" >&3; KEEP=1; exit 1; }

# ---------------------------------------------------------------- tools
command -v fio >/dev/null || die "fio is missing (apt-get install fio)"
fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine"
command -v qemu-nbd >/dev/null || die "qemu-nbd is missing (apt-get install qemu-utils)"
have_socat=1
command -v socat >/dev/null || { have_socat=0; echo "socat missing: the shim's status is not checked"; }

if [ -n "${SHIM:-}" ]; then
  shim=$SHIM
else
  shim=$root/target/release/filter-driver-shim-test
  if [ ! -x "$shim" ] || [ -n "$(find "$root/filter-driver-shim" "$root/Cargo.lock" -newer "$shim" -type f -print -quit)" ]; then
    echo "building $shim (release)..."
    (cd "$root" && cargo build --release -q -p filter-driver-shim --bin filter-driver-shim-test)
  fi
fi
[ -x "$shim" ] || die "no shim binary at $shim"

# ---------------------------------------------------------------- helpers
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
ticks_to_s() { awk -v t="$1" -v hz="$clk_tck" 'BEGIN { printf "%.1f", t / hz }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

mkdir -p "$work"
img=$work/disk.img
sock=$work/nbd.sock
size_bytes=$(( size_mib * 1024 * 1024 ))
echo "allocating the ${size_mib} MiB image on $work..."
rm -f "$img"
if ! fallocate -l "$size_bytes" "$img" 2>/dev/null; then
  dd if=/dev/zero of="$img" bs=1M count="$size_mib" status=none
fi

start_shim() {
  local engine_args=()
  # FERRY_SHIM_IO_ENGINE would override --io-engine: clear it for a named engine.
  [ -n "${1:-}" ] && engine_args=(env FERRY_SHIM_IO_ENGINE= "$shim" --io-engine "$1")
  [ -n "${1:-}" ] || engine_args=("$shim")
  rm -rf "$state_dir"
  rm -f "$sock" "$work/ctl.sock"
  "${engine_args[@]}" --control "$work/ctl.sock" \
    --disk "name=bench,path=$img,socket=$sock,state_dir=$state_dir,block_size=65536" \
    >"$work/shim.out" 2>>"$work/shim.log" &
  server=$!
  for _ in $(seq 1 200); do
    grep -q READY "$work/shim.out" 2>/dev/null && return 0
    kill -0 "$server" 2>/dev/null || die "the shim exited; see $work/shim.log"
    sleep 0.05
  done
  die "the shim is not READY after 10 s"
}

start_qemu_nbd() {
  rm -f "$sock"
  qemu-nbd -f raw -t -k "$sock" "$img" 2>>"$work/qemu-nbd.log" &
  server=$!
  for _ in $(seq 1 200); do
    [ -S "$sock" ] && return 0
    kill -0 "$server" 2>/dev/null || die "qemu-nbd exited; see $work/qemu-nbd.log"
    sleep 0.05
  done
  die "qemu-nbd did not create $sock after 10 s"
}

# `ferry shim` + `ferry source` → `ferry target` on loopback, defaults but for the
# paths; the first (full) sync is done before fio starts.
start_shim_repl() {
  local port r=$work/repl
  rm -rf "$r" "$sock"
  mkdir -p "$r"
  "$ferry" keygen --out "$r/key" >/dev/null
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf '[target]\nlisten = "127.0.0.1:%s"\npsk_file = "%s/key"\nstate_dir = "%s/tstate"\n[[disk]]\nname = "bench"\npath = "%s/replica.img"\n' \
    "$port" "$r" "$r" "$r" > "$r/target.toml"
  printf '[source]\ntarget = "127.0.0.1:%s"\npsk_file = "%s/key"\nstate_dir = "%s/sstate"\n[[disk]]\nname = "bench"\npath = "%s"\nnbd_socket = "%s"\n' \
    "$port" "$r" "$r" "$img" "$sock" > "$r/source.toml"
  "$ferry" target --config "$r/target.toml" 2>>"$work/repl-target.log" &
  helpers+=($!)
  "$ferry" shim --config "$r/source.toml" 2>>"$work/shim.log" &
  server=$!
  for _ in $(seq 1 200); do
    [ -S "$sock" ] && grep -q listening "$work/repl-target.log" && break
    kill -0 "$server" 2>/dev/null || die "ferry shim exited; see $work/shim.log"
    sleep 0.05
  done
  "$ferry" sync --config "$r/source.toml" >/dev/null 2>>"$work/repl-sync.log" || die "first sync failed; see $work/repl-sync.log"
  "$ferry" source --config "$r/source.toml" 2>>"$work/repl-source.log" &
  helpers+=($!)
}

stop_server() {
  for p in $server "${helpers[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  server=""
  helpers=()
}

# The shim must have tracked the job's writes: dirty blocks in its status.
check_tracking() {
  [ "$have_socat" = 1 ] || return 0
  local status dirty
  status=$(echo status | socat -t 5 - "UNIX-CONNECT:$work/ctl.sock")
  dirty=$(printf '%s' "$status" | grep -o '"dirty_blocks":[0-9]*' | head -n1 | cut -d: -f2)
  [ "${dirty:-0}" -gt 0 ] || die "the shim tracked no block: $status"
  tracked="$dirty dirty blocks, $(printf '%s' "$status" | grep -o '"bitmap_syncs":[0-9]*' | cut -d: -f2) bitmap syncs"
}

# run_job SERVER JOB: one fio job against a fresh server; sets `value` (IOPS or MiB/s)
# and `cpu` (server CPU seconds).
run_job() {
  local srv=$1 job=$2 c0 c1 args
  case $job in
    randwrite) args=(--rw=randwrite --bs=4k --iodepth="$rand_qd") ;;
    seqwrite) args=(--rw=write --bs=1M --iodepth="$seq_qd") ;;
  esac
  local target=(--ioengine=nbd --uri="nbd+unix:///?socket=$sock")
  case $srv in
    shim) start_shim ;;
    shim-repl) start_shim_repl ;;
    shim-*) start_shim "${srv#shim-}" ;;
    qemu-nbd) start_qemu_nbd ;;
    direct) target=(--ioengine=io_uring --filename="$img" --direct=0) ;;
  esac
  c0=$(cpu_ticks "${server:-0}")
  fio --name="$job" "${target[@]}" "${args[@]}" \
    --size="${size_mib}M" --time_based --runtime="$runtime" --numjobs=1 \
    --output-format=terse --terse-version=3 >"$work/fio.out" 2>>"$work/fio.log" \
    || die "fio $job against $srv failed; see $work/fio.log"
  c1=$(cpu_ticks "${server:-0}")
  tracked=""
  case $srv in shim-repl) ;; shim*) check_tracking ;; esac
  stop_server
  # Terse v3: field 48 is the write bandwidth in KiB/s, 49 the write IOPS.
  case $job in
    randwrite) value=$(awk -F';' '$1 == 3 { printf "%.0f", $49 }' "$work/fio.out") ;;
    seqwrite) value=$(awk -F';' '$1 == 3 { printf "%.0f", $48 / 1024 }' "$work/fio.out") ;;
  esac
  cpu=$(ticks_to_s $((c1 - c0)))
}

declare -A results cpus
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; REPS=$reps RUNTIME=${runtime}s"
echo "shim: $shim"
echo "qemu-nbd: $(qemu-nbd --version | head -n1)"
echo "fio: $(fio --version)"
shims=(shim)
if [ -n "${SHIM_ENGINES:-}" ]; then
  shims=()
  for e in $SHIM_ENGINES; do shims+=("shim-$e"); done
fi
if [ "${WITH_REPL:-0}" = 1 ]; then
  ferry=${FERRY:-$root/target/release/ferry}
  if [ -z "${FERRY:-}" ]; then
    (cd "$root" && cargo build --release -q --bin ferry) || die "cannot build ferry"
  fi
  shims+=(shim-repl)
fi
servers=("${shims[@]}" qemu-nbd)
[ "${WITH_DIRECT:-0}" = 1 ] && servers+=(direct)
for rep in $(seq 1 "$reps"); do
  # Rotate the servers by one each round (for two, that alternates them).
  order=()
  for i in "${!servers[@]}"; do
    order+=("${servers[$(( (i + rep - 1) % ${#servers[@]} ))]}")
  done
  for job in randwrite seqwrite; do
    for srv in "${order[@]}"; do
      run_job "$srv" "$job"
      results[$srv,$job]="${results[$srv,$job]:-} $value"
      cpus[$srv,$job]="${cpus[$srv,$job]:-} $cpu"
      unit=IOPS; [ "$job" = seqwrite ] && unit=MiB/s
      printf 'round %d  %-9s %-8s %8s %-5s  server CPU %5ss%s\n' "$rep" "$job" "$srv" "$value" "$unit" "$cpu" \
        "${tracked:+  ($tracked)}"
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
# summary SERVER JOB: the bar lines; every figure is a median of this run.
summary() {
  local s=$1 job=$2 m q d what
  # shellcheck disable=SC2086 # word splitting of the lists is intended
  { m=$(median ${results[$s,$job]}); q=$(median ${results[qemu-nbd,$job]}); }
  what="4k-randwrite"; [ "$job" = seqwrite ] && what="1m-seqwrite"
  line="summary: guest-path $what $s/qemu-nbd $(ratio "$m" "$q")x (bar 2.0x)"
  line+=" $(awk -v r="$(ratio "$m" "$q")" 'BEGIN { print (r >= 2.0) ? "PASS" : "FAIL" }')"
  if [ -n "${results[direct,$job]:-}" ]; then
    # shellcheck disable=SC2086
    d=$(median ${results[direct,$job]})
    line+="; $s/direct-io_uring $(ratio "$m" "$d")x"
  fi
  echo "$line"
}
if [ -n "${SHIM_ENGINES:-}" ] || [ "${#servers[@]}" -gt 2 ]; then
  # One column per server, then each shim engine's ratio to qemu-nbd and to the
  # first engine named.
  header="| workload |"; rule="|---|"
  for srv in "${servers[@]}"; do header+=" $srv (median; runs) |"; rule+="---:|"; done
  for s in "${shims[@]}"; do header+=" $s / qemu-nbd |"; rule+="---:|"; done
  for s in "${shims[@]:1}"; do header+=" ${shims[0]} / $s |"; rule+="---:|"; done
  header+=" server CPU s (medians) |"; rule+="---:|"
  echo "$header"; echo "$rule"
  for job in randwrite seqwrite; do
    case $job in
      randwrite) line="| 4 KiB random write, QD$rand_qd, IOPS |" ;;
      seqwrite) line="| 1 MiB sequential write, QD$seq_qd, MiB/s |" ;;
    esac
    declare -A med=()
    cpu_line=""
    for srv in "${servers[@]}"; do
      # shellcheck disable=SC2086 # word splitting of the lists is intended
      med[$srv]=$(median ${results[$srv,$job]})
      # shellcheck disable=SC2086
      cpu_line+="${cpu_line:+ / }$(median ${cpus[$srv,$job]})"
      # shellcheck disable=SC2086
      line+=" ${med[$srv]} ($(echo ${results[$srv,$job]} | sed 's/ /, /g')) |"
    done
    for s in "${shims[@]}"; do line+=" $(ratio "${med[$s]}" "${med[qemu-nbd]}") |"; done
    for s in "${shims[@]:1}"; do line+=" $(ratio "${med[${shims[0]}]}" "${med[$s]}") |"; done
    echo "$line $cpu_line |"
    unset med
  done
  echo
  for job in randwrite seqwrite; do
    for s in "${shims[@]}"; do summary "$s" "$job"; done
  done
  exit 0
fi

printf '| workload | ferry shim | qemu-nbd | ratio shim/qemu-nbd (medians) | server CPU s, shim / qemu-nbd (medians) |\n'
printf '|---|---:|---:|---:|---:|\n'
for job in randwrite seqwrite; do
  # shellcheck disable=SC2086 # word splitting of the lists is intended
  {
    s_med=$(median ${results[shim,$job]})
    q_med=$(median ${results[qemu-nbd,$job]})
    s_cpu=$(median ${cpus[shim,$job]})
    q_cpu=$(median ${cpus[qemu-nbd,$job]})
  }
  case $job in
    randwrite) what="4 KiB random write, QD$rand_qd, IOPS" ;;
    seqwrite) what="1 MiB sequential write, QD$seq_qd, MiB/s" ;;
  esac
  printf '| %s | %s (%s) | %s (%s) | %s | %s / %s |\n' "$what" \
    "$s_med" "$(echo ${results[shim,$job]} | sed 's/ /, /g')" \
    "$q_med" "$(echo ${results[qemu-nbd,$job]} | sed 's/ /, /g')" \
    "$(ratio "$s_med" "$q_med")" "$s_cpu" "$q_cpu"
done
echo
for job in randwrite seqwrite; do summary shim "$job"; done
