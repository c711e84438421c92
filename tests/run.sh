#!/usr/bin/env bash
# Installs what pop needs, builds it and runs every test.
#   tests/run.sh                      plain build: all tests, the kill -9 soak, the examples, an
#                                     installed-package consumer and benchmark smoke runs
#   tests/run.sh --sanitize=address   the whole test suite under AddressSanitizer + UBSan
#   tests/run.sh --sanitize=thread    the concurrency and NATS tests under ThreadSanitizer
#   tests/run.sh --fuzz               the libFuzzer targets (clang), each for 30 seconds
# POP_WERROR=ON in the environment turns warnings into errors (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize=""
for arg in "$@"; do
  case "$arg" in
    --sanitize=*) sanitize="${arg#--sanitize=}" ;;
    --fuzz) sanitize="fuzz" ;;
    *) echo "usage: tests/run.sh [--sanitize=address|thread] [--fuzz]" >&2; exit 2 ;;
  esac
done
bash .ci/install-deps.sh
jobs=$(nproc)
werror="-DPOP_WERROR=${POP_WERROR:-OFF}"

case "$sanitize" in
  "")
    # Release, as users build it.
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$werror" >/dev/null
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
    ./build/consumer/engine_consumer
    ./build/consumer/readme_example
    ./build/consumer/consumer
    # An engine-only program links neither libnats nor anything else of the adapters.
    if ldd build/consumer/engine_consumer | grep -q libnats; then
      echo "engine_consumer links libnats" >&2
      exit 1
    fi
    ;;
  address)
    cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPOP_SANITIZE=address \
      -DPOP_BUILD_BENCH=OFF "$werror" >/dev/null
    cmake --build build-asan -j "$jobs"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir build-asan --no-tests=error --output-on-failure -j "$jobs"
    ;;
  thread)
    cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPOP_SANITIZE=thread \
      -DPOP_BUILD_BENCH=OFF -DPOP_BUILD_EXAMPLES=OFF "$werror" >/dev/null
    # nats_test is concurrent too: libnats threads acknowledge into the relay's strand, and the
    # ingress applies a batch on several threads.
    cmake --build build-tsan -j "$jobs" --target engine_concurrency_test relay_concurrency_test \
      workflow_concurrency_test nats_test nats_ingress_child
    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
      ctest --test-dir build-tsan --no-tests=error --output-on-failure -j "$jobs" \
      -R "concurrency|nats_test"
    ;;
  fuzz)
    bash .ci/install-deps.sh clang-14 libclang-rt-14-dev
    cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++-14 \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPOP_FUZZ=ON -DPOP_BUILD_TESTS=OFF \
      -DPOP_BUILD_EXAMPLES=OFF -DPOP_BUILD_BENCH=OFF "$werror" >/dev/null
    targets=(path process_spec workflow_definition stored_message journal nats_message)
    cmake --build build-fuzz -j "$jobs" --target "${targets[@]/#/fuzz_}"
    # Two at a time, 30 seconds each (POP_FUZZ_SECONDS), from the seed corpus (new finds go to a
    # scratch copy): a smoke run in CI; run them longer by hand after changing a decoder.
    run_one() {
      local t=$1 work
      work=$(mktemp -d)
      cp -r "tests/fuzz/corpus/$t/." "$work/"
      local rc=0
      ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        "build-fuzz/tests/fuzz/fuzz_$t" -max_total_time="${POP_FUZZ_SECONDS:-30}" -timeout=10 \
        -rss_limit_mb=4096 -artifact_prefix="build-fuzz/crash-$t-" "$work" \
        >"build-fuzz/fuzz_$t.log" 2>&1 || rc=$?
      rm -rf "$work"
      if [ $rc -ne 0 ]; then tail -40 "build-fuzz/fuzz_$t.log"; echo "fuzz_$t failed" >&2; fi
      return $rc
    }
    failed=0
    for ((i = 0; i < ${#targets[@]}; i += 2)); do
      pids=()
      for t in "${targets[@]:i:2}"; do run_one "$t" & pids+=($!); done
      for p in "${pids[@]}"; do wait "$p" || failed=1; done
    done
    [ $failed -eq 0 ] || exit 1
    echo "fuzz targets ran clean: ${targets[*]}"
    ;;
  *) echo "unknown sanitizer '$sanitize' (address or thread)" >&2; exit 2 ;;
esac
