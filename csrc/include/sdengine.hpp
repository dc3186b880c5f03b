// C++ conveniences over the C API (sdengine.h): RAII owners and an exception on failure.
// Header-only; the library's ABI stays the C one.
//
//     sde::ModelPtr model = sde::load_model("models/sd15");
//     sde_gen_params p; sde_gen_params_init(&p); p.prompt = "a red fox";
//     sde::Images images = sde::generate(model.get(), p);   // throws sde::Error on failure
//     images[0].data ...
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include "sdengine.h"

namespace sde {

// A failed call: status() and what(). check() throws it for a failed C call, with the
// status's description and sde_last_error(); the library's own sources throw it (and its
// subclasses, one per status) internally and turn it back into a status at the C boundary.
class Error : public std::runtime_error {
 public:
  Error(sde_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
  sde_status status() const { return status_; }

 private:
  sde_status status_;
};

// The old name of Error, kept for one release.
using Failure [[deprecated("use sde::Error")]] = Error;

inline void check(sde_status status) {
  if (status != SDE_OK) throw Error(status, std::string(sde_status_str(status)) + ": " + sde_last_error());
}

struct ModelDeleter {
  void operator()(sde_model *m) const { sde_model_free(m); }
};
struct TokenizerDeleter {
  void operator()(sde_tokenizer *t) const { sde_tokenizer_free(t); }
};
using ModelPtr = std::unique_ptr<sde_model, ModelDeleter>;
using TokenizerPtr = std::unique_ptr<sde_tokenizer, TokenizerDeleter>;

// Owns the images of one sde_model_generate call.
class Images {
 public:
  Images() = default;
  Images(sde_image *images, int count) : images_(images), count_(count) {}
  Images(Images &&o) noexcept : images_(o.images_), count_(o.count_) { o.images_ = nullptr, o.count_ = 0; }
  Images &operator=(Images &&o) noexcept {
    if (this != &o) {
      sde_images_free(images_, count_);
      images_ = o.images_, count_ = o.count_;
      o.images_ = nullptr, o.count_ = 0;
    }
    return *this;
  }
  Images(const Images &) = delete;
  Images &operator=(const Images &) = delete;
  ~Images() { sde_images_free(images_, count_); }

  int size() const { return count_; }
  const sde_image &operator[](int i) const { return images_[i]; }

 private:
  sde_image *images_ = nullptr;
  int count_ = 0;
};

inline ModelPtr load_model(const std::string &path, const sde_model_params *params = nullptr) {
  sde_model *m = nullptr;
  check(sde_model_load(path.c_str(), params, &m));
  return ModelPtr(m);
}

inline Images generate(sde_model *model, const sde_gen_params &params) {
  sde_image *images = nullptr;
  int count = 0;
  check(sde_model_generate(model, &params, &images, &count));
  return Images(images, count);
}

}  // namespace sde
