#!/usr/bin/env bash
# Installs the Debian packages blockguard's tests, demo and benchmarks drive, when missing.
# Needs root for apt-get; a no-op when everything is there.
set -euo pipefail

# command -> package
declare -A need=(
  [qemu-io]=qemu-utils
  [qemu-img]=qemu-utils
  [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [nbdkit]=nbdkit
  [fio]=fio
  [fusermount3]=fuse3
  [mkfs.ext4]=e2fsprogs
  [fsck.ext4]=e2fsprogs
  [debugfs]=e2fsprogs
  [losetup]=mount
  # Partitions of loop devices (the lock and same-source tests).
  [addpart]=util-linux
  [delpart]=util-linux
  # libFuzzer (scripts/fuzz.sh) is C++, built by libfuzzer-sys's build script.
  [g++]=g++
  # Certificates for the TLS tests (tests/nbd_tls.rs) and bench/tls.sh.
  [openssl]=openssl
)
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
    missing+=("${need[$cmd]}")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
echo "install-deps: installing $pkgs" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: need root to install: $pkgs" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq $pkgs >/dev/null
