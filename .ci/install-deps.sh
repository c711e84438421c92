#!/usr/bin/env bash
# Installs the Debian 12 packages pop needs to build, test and benchmark, plus any named as
# arguments (the fuzz run adds clang). Idempotent, noninteractive.
set -euo pipefail
packages=(cmake ninja-build g++ pkg-config ccache clang-format libboost1.81-dev nlohmann-json3-dev
  libabsl-dev catch2 librapidcheck-dev libbenchmark-dev libsqlite3-dev sqlite3 nats-server
  libnats-dev libcli11-dev libfmt-dev graphviz "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get -q -o DPkg::Lock::Timeout=300 update
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}"
fi
