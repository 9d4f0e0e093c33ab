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
# The real guest (tests/it/vm_boot.rs) runs from an initramfs of busybox-static; its
# kernel comes from `apt-get download linux-image-amd64` (see tests/it/common/vm.rs).
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)

if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    $SUDO apt-get install -y -q "$@"
  }
}
# The real guest's emulator. qemu-system-x86 and qemu-utils must be of one version: a
# newer qemu-utils (from backports, say) breaks the distribution's qemu-system-common,
# and installing the emulator alone would take qemu-utils (qemu-io, qemu-img, qemu-nbd)
# away. So both are installed in one command at the emulator's version (the suite
# passes with the distribution's qemu-utils 7.2), without the emulator's recommended
# audio and video libraries.
if ! have qemu-system-x86_64; then
  candidate() { apt-cache policy "$1" | awk '/Candidate:/ { print $2 }'; }
  qemu=$(candidate qemu-system-x86)
  if [ -z "$qemu" ] || [ "$qemu" = "(none)" ]; then
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    qemu=$(candidate qemu-system-x86)
  fi
  echo "tools/test.sh: installing qemu-system-x86 and qemu-utils $qemu"
  apt_install --no-install-recommends --allow-downgrades qemu-system-x86 "qemu-utils=$qemu"
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "tools/test.sh: installing ${need[*]}"
  apt_install "${need[@]}"
fi
# Every tool the suite runs must be here now (one package's install can remove another's).
missing=()
for tool in qemu-img qemu-io qemu-nbd qemu-system-x86_64 nbdinfo nbdsh nbdkit fio ip socat \
  rsync zstd fusermount3; do
  have "$tool" || missing+=("$tool")
done
for tool in mke2fs mkfs.ext4 e2fsck; do
  have "$tool" || [ -x "/sbin/$tool" ] || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
[ -x /bin/busybox ] || missing+=(/bin/busybox)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tools/test.sh: still missing after installing: ${missing[*]}" >&2
  exit 1
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
