// Fuzz target: journal files as found on disk. The input becomes the journal's main file; opening
// it must return a status (kDataLoss, kFailedPrecondition, ...) or an engine, never crash.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "pop/engine/engine.hpp"
#include "pop/engine/journal.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string file = "/tmp/pop-fuzz-journal-" + std::to_string(::getpid()) + ".db";
  for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
    std::remove((file + suffix).c_str());
  if (std::FILE* f = std::fopen(file.c_str(), "wb")) {
    std::fwrite(data, 1, size, f);
    std::fclose(f);
  }
  static_cast<void>(pop::verify_journal(file));
  static_cast<void>(pop::read_journal(file));
  static_cast<void>(pop::engine::open({.journal = file}));
  return 0;
}
