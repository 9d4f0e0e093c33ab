#!/usr/bin/env bash
# Every performance bar of issue 12 in one command, at the shipped defaults: runs each
# benchmark script (each runs ferry and its peer side by side in one run) and prints
# one line per bar at the end, from the `summary:` lines the scripts end with.
#
#   full sync, loopback, defaults        ≥ 2.0× nbdcopy → qemu-nbd      benches/peers.sh
#   full sync, 1 Gbit/s and 100 Mbit/s   ≥ 1.5× zstd -1|socat, ≥ 2.5×    benches/shaped-link.sh
#     (tbf-shaped veth between netns)    nbdcopy; ≤ zstd -3's bytes       (needs root)
#   RPO, 4 KiB random writes 50 MB/s,    p99 ≤ 2 s, not growing          benches/rpo.sh
#     1 s epochs, 5 minutes
#   RPO, 64 KiB random writes 100 MB/s,  p99 ≤ 1 s                       benches/rpo.sh
#     500 ms epochs
#   idle epoch, end to end               < 5 ms                          benches/rpo.sh (RATE=0)
#   staging (undo log) on a full rewrite ≥ 0.8× unstaged                 benches/staging.sh
#   guest path, 4 KiB random / 1 MiB     ≥ 2× qemu-nbd, with and         benches/shim-vs-qemu-nbd.sh
#     sequential writes through the shim without replication; and the
#                                        fraction of direct io_uring
#
# A script that cannot run says so in its line (FAILED TO RUN, with its log kept);
# shaped-link.sh says "skipped" without root.
#
# usage: benches/bars.sh
# env:   QUICK=1 (short runs: a smoke check of the scripts, not the bars' figures)
#        FERRY=target/release/ferry  SHIM=target/release/filter-driver-shim-test
#        OUT=/dev/shm/ferry-bars.$$ (every script's whole output, kept)
set -Euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
out=${OUT:-$shm/ferry-bars.$$}
mkdir -p "$out"
quick=${QUICK:-0}

if [ -z "${FERRY:-}" ] || [ -z "${SHIM:-}" ]; then
  (cd "$root" && cargo build --release -q -p ferry -p filter-driver-shim) || {
    echo "bars.sh: cannot build the release binaries" >&2
    exit 1
  }
fi
export FERRY=${FERRY:-$root/target/release/ferry}
export SHIM=${SHIM:-$root/target/release/filter-driver-shim-test}

# run NAME ENV... -- SCRIPT ARGS...: one benchmark, its output in $out/NAME.log.
run() {
  local name=$1 envs=()
  shift
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  echo "== $name: ${envs[*]} $*"
  if env "${envs[@]}" "$@" >"$out/$name.log" 2>&1; then
    grep '^summary:' "$out/$name.log" || echo "summary: $name printed no summary (see $out/$name.log)" | tee -a "$out/$name.log"
  else
    echo "summary: $name FAILED TO RUN (exit $?; see $out/$name.log)" | tee -a "$out/$name.log"
  fi
}

if [ "$quick" = 1 ]; then
  long=40; mid=20; reps=1; size=256
else
  long=300; mid=120; reps=3; size=1024
fi
b=$root/benches
run peers REPS=$reps -- "$b/peers.sh" "$size"
run shaped-link REPS=$reps -- "$b/shaped-link.sh"
run rpo-4k RATE=50m BS=4k INTERVAL_MS=1000 RUNTIME=$long -- "$b/rpo.sh"
run rpo-64k RATE=100m BS=64k INTERVAL_MS=500 RUNTIME=$mid -- "$b/rpo.sh"
run idle-epoch RATE=0 INTERVAL_MS=500 RUNTIME=$mid -- "$b/rpo.sh"
run staging REPS=$reps -- "$b/staging.sh"
run guest-path REPS=$reps WITH_REPL=1 WITH_DIRECT=1 SIZE_MIB=$size -- "$b/shim-vs-qemu-nbd.sh"

echo
echo "issue 12 bars ($(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); logs in $out):"
cat "$out"/*.log | grep '^summary:' | sed 's/^summary: /  /'
