// The runtime's file readers on their own, for fuzzing under AddressSanitizer
// (tests/fuzz_files.py drives it; tests/c/run_asan.sh runs it).
//
//   sde_fuzz_reader safetensors < paths              a safetensors file per line
//   sde_fuzz_reader engine < paths                   an engine.json per line
//   sde_fuzz_reader single-file ENGINE_JSON < paths  a single-file checkpoint per line, mapped
//                                                    onto that engine's constants
// One answer line per path: "ok <fnv1a64>" (accepted; the digest of what was read, as
// tests/fuzz_files.py Read.digest() computes it; 0 for engine.json) or "err <message>".
//
// Every path is read in this one process, so a memory error or leak in any of them fails
// the run.
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <map>
#include <string>

#include "engine_meta.h"
#include "errors.h"
#include "safetensors.h"
#include "single_file.h"

namespace {

struct Fnv1a {
  uint64_t h = 14695981039346656037ull;
  void add(const void *data, size_t n) {
    const auto *p = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  void add(const std::string &s) { add(s.data(), s.size() + 1); }  // with its terminating NUL
};

// The digest of tests/fuzz_files.py: for each tensor by name, name, dtype, shape as
// "d0,d1,", then the raw bytes; then "__metadata__" and each key and value, if any.
uint64_t digest(const sde::SafetensorsFile &file) {
  Fnv1a f;
  for (const auto &name : file.names()) {
    at::Tensor t = file.tensor(name);
    f.add(name);
    f.add(file.dtype_name(name));
    std::string shape;
    for (auto d : t.sizes()) shape += std::to_string(d) + ",";
    f.add(shape);
    f.add(t.data_ptr(), t.nbytes());
  }
  if (file.has_metadata()) {
    f.add(std::string("__metadata__"));
    for (const auto &[key, value] : file.metadata_map()) {
      f.add(key);
      f.add(value);
    }
  }
  return f.h;
}

// The same digest over a single file's weights as the engine names them (no metadata).
uint64_t digest(const sde::WeightMap &weights) {
  std::map<std::string, at::Tensor> sorted(weights.begin(), weights.end());
  Fnv1a f;
  for (const auto &[name, tensor] : sorted) {
    at::Tensor t = tensor.contiguous();
    f.add(name);
    f.add(std::string(sde::safetensors_dtype_name(t.scalar_type())));
    std::string shape;
    for (auto d : t.sizes()) shape += std::to_string(d) + ",";
    f.add(shape);
    f.add(t.data_ptr(), t.nbytes());
  }
  return f.h;
}

std::string one_line(std::string s) {
  for (auto &c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

}  // namespace

int main(int argc, char **argv) {
  std::string mode = argc >= 2 ? argv[1] : "";
  if (!((mode == "safetensors" || mode == "engine") && argc == 2) && !(mode == "single-file" && argc == 3)) {
    std::fprintf(stderr, "usage: %s safetensors|engine|single-file ENGINE_JSON < paths\n", argv[0]);
    return 2;
  }
  sde::Json engine;
  if (mode == "single-file") {
    engine = sde::Json::read_file(argv[2]);
    sde::check_engine_json(engine, argv[2]);
  }
  std::string path;
  while (std::getline(std::cin, path)) {
    try {
      uint64_t h = 0;
      if (mode == "safetensors") {
        h = digest(sde::SafetensorsFile(path));
      } else if (mode == "engine") {
        sde::check_engine_json(sde::Json::read_file(path), path);
      } else {
        h = digest(sde::single_file_weights(sde::SafetensorsFile(path), engine));
      }
      std::printf("ok %016llx\n", static_cast<unsigned long long>(h));
    } catch (const sde::Error &e) {
      std::printf("err %s\n", one_line(e.what()).c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}
