#!/usr/bin/env bash
# The one test command: installs what the tests need (Debian packages), then runs the
# whole suite: format and lint gates, unit, integration and end-to-end tests, and the
# ringbuf loom models. Long soak tests run only with FERRY_SOAK=1.
#
# Tests that need something a machine may lack skip with a printed reason. FERRY_REQUIRE,
# a comma list of uring, loop, fuse, netns, root, tools (the packages below), direct
# (O_DIRECT that enforces alignment in the temporary directory), turns every skip for
# those features into a failure; .ci/run sets it to what the CI machines provide.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FERRY_REQUIRE:-}" ]; then
  echo "tools/test.sh: FERRY_REQUIRE=$FERRY_REQUIRE: a test that would skip for one of these fails"
  export FERRY_REQUIRE
fi

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img  || need+=(qemu-utils)
have qemu-io   || need+=(qemu-utils)
have nbdinfo   || need+=(libnbd-bin)
have nbdsh     || need+=(python3-libnbd)
have nbdkit    || need+=(nbdkit)
have fio       || need+=(fio)
have mke2fs    || [ -x /sbin/mke2fs ] || [ -x /usr/sbin/mke2fs ] || need+=(e2fsprogs)
have ip        || need+=(iproute2)
have socat     || need+=(socat)
have rsync     || need+=(rsync)
have zstd      || need+=(zstd)
# ferry-powerfail (tests/it/power_loss.rs) mounts with mount(2) as root; others need fusermount3.
have fusermount3 || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
  echo "tools/test.sh: installing ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    $SUDO apt-get install -y -q "${need[@]}"
  }
fi

export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Lock-free ring models (separate target dir: loom changes every dependency's cfg).
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p ferry-ringbuf --release --lib -q
# Fuzz targets of every trust boundary (separate crate): their own tests, then a short
# deterministic smoke run of each on stable. Long runs: see fuzz/README.md.
cargo test --release -q --manifest-path fuzz/Cargo.toml
cargo run --release -q --manifest-path fuzz/Cargo.toml --bin smoke -- 5
