#!/usr/bin/env bash
# Installs what pop needs, builds the flagship example and runs it on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build --target quickstart
./build/examples/quickstart "$@"
