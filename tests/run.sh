#!/usr/bin/env bash
# Installs what pop needs, builds it and runs every test.
#   tests/run.sh                      plain build: all tests, the kill -9 soak, the examples, an
#                                     installed-package consumer and benchmark smoke runs
#   tests/run.sh --sanitize=address   the whole test suite under AddressSanitizer + UBSan
#   tests/run.sh --sanitize=thread    the concurrency and NATS tests under ThreadSanitizer
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize=""
for arg in "$@"; do
  case "$arg" in
    --sanitize=*) sanitize="${arg#--sanitize=}" ;;
    *) echo "usage: tests/run.sh [--sanitize=address|thread]" >&2; exit 2 ;;
  esac
done
bash .ci/install-deps.sh
jobs=$(nproc)

case "$sanitize" in
  "")
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    cmake --build build -j "$jobs"
    ctest --test-dir build --no-tests=error --output-on-failure -j "$jobs"
    # The crash soak: kill -9 at 300 random moments (its seed is printed on failure).
    ./build/tests/journal_crash_test "[soak]"
    # find_package(pop) from an installed prefix, used by a tiny consumer.
    rm -rf build/install-root build/consumer
    cmake --install build --prefix build/install-root >/dev/null
    cmake -S tests/install_consumer -B build/consumer -G Ninja \
      -DCMAKE_PREFIX_PATH="$PWD/build/install-root" >/dev/null
    cmake --build build/consumer
    ./build/consumer/consumer
    ;;
  address)
    cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPOP_SANITIZE=address \
      -DPOP_BUILD_BENCH=OFF >/dev/null
    cmake --build build-asan -j "$jobs"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir build-asan --no-tests=error --output-on-failure -j "$jobs"
    ;;
  thread)
    cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPOP_SANITIZE=thread \
      -DPOP_BUILD_BENCH=OFF -DPOP_BUILD_EXAMPLES=OFF >/dev/null
    # nats_test is concurrent too: libnats threads acknowledge into the relay's strand, and the
    # ingress applies a batch on several threads.
    cmake --build build-tsan -j "$jobs" --target engine_concurrency_test relay_concurrency_test \
      nats_test nats_ingress_child
    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
      ctest --test-dir build-tsan --no-tests=error --output-on-failure -j "$jobs" \
      -R "concurrency|nats_test"
    ;;
  *) echo "unknown sanitizer '$sanitize' (address or thread)" >&2; exit 2 ;;
esac
