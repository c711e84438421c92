#!/usr/bin/env bash
# Installs what pop needs, builds the flagship example and runs it on the embedded default: an
# SQLite journal (order_pipeline.db in build/run/, started fresh each time). Options pass through:
#   bash examples/run.sh --orders 5000 --decline-rate 0.3 --sink -
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target order_pipeline
mkdir -p build/run
cd build/run
rm -f order_pipeline.db order_pipeline.db-wal order_pipeline.db-shm order_pipeline.events.jsonl
../examples/order_pipeline --orders 2000 "$@"
