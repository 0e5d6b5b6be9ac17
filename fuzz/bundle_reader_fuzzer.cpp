// libFuzzer harness for the C++ bundle reader (csrc/format/bundle_reader.cpp), built by
// scripts/fuzz.sh with -fsanitize=fuzzer,address,undefined. Each input is written to a file and
// opened as a bundle; a clean run either refuses it with BundleError or reads every tensor's
// first and last byte and verifies the checksums. Anything else (a sanitizer report, another
// exception, a crash) is a finding.
//
// The custom mutator re-signs what it mutates: after libFuzzer's byte-level mutation it recomputes
// the three section checksums (where the header's sections lie inside the input) and the header's
// own, so that mutations reach the structural checks behind the checksums, as a hostile author would.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "format/bundle_reader.h"
#include "format/sha256.h"

namespace {

char input_file[64];

void remove_input() { std::remove(input_file); }

const char* input_path() {
  if (!input_file[0]) {
    std::snprintf(input_file, sizeof input_file, "/dev/shm/pocketlm-reader-fuzz-%d.plm", static_cast<int>(getpid()));
    std::atexit(remove_input);
  }
  return input_file;
}

uint64_t read_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void resign(uint8_t* data, size_t size) {
  if (size < 256) return;
  // (offset field, bytes field, checksum slot) of the metadata, index and data sections.
  const size_t sections[3][3] = {{24, 32, 72}, {40, 48, 104}, {56, 64, 136}};
  for (const auto& s : sections) {
    const uint64_t offset = read_u64(data + s[0]), bytes = read_u64(data + s[1]);
    if (offset <= size && bytes <= size - offset) {
      const auto digest = plm::sha256(data + offset, bytes);
      std::memcpy(data + s[2], digest.data(), 32);
    }
  }
  const auto header = plm::sha256(data, 168);
  std::memcpy(data + 168, header.data(), 32);
}

}  // namespace

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  size = LLVMFuzzerMutate(data, size, max_size);
  if (seed % 16 != 0) resign(data, size);  // one in 16 stays unsigned: the checksum checks get fuzzed too
  return size;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FILE* f = std::fopen(input_path(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    auto bundle = plm::Bundle::open(input_path());
    volatile uint8_t sink = 0;
    for (const auto& t : bundle->tensors()) {
      if (t.nbytes) sink ^= t.data[0] ^ t.data[t.nbytes - 1];
    }
    (void)sink;
    bundle->verify();
  } catch (const plm::BundleError&) {
  }
  return 0;
}
