// LoRA and textual inversion in the C++ runtime, by the rules of sdengine/lora.py and
// sdengine/embeddings.py (the Python side is the reference; tests compare the two).
//
// A LoRA is merged into the tensors the compiled networks already read (in place: every
// engine and captured graph stays valid). The names a LoRA file may use come from the engine:
// engine.json's "lora" table ({module name: "<component>/<key>"}), written at export from
// sdengine.lora.lora_names, so both sides map keys through one table. Files are
// .safetensors only (pickled files are read from Python).
#pragma once

#include <ATen/Tensor.h>

#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace sde {

// LoRA module name (kohya's "lora_unet_...", PEFT's "unet.down_blocks...") -> "<component>/<key>".
using LoraNames = std::unordered_map<std::string, std::string>;

struct LoraSpec {
  std::string path;
  double scale = 1.0;
};

// One weight's update: delta = scale * up @ down, reshaped to the weight.
struct LoraLayer {
  std::string target;  // "<component>/<key>"
  std::string module;  // the name in the file, for messages
  at::Tensor down;     // (rank, in) or (rank, in, kh, kw)
  at::Tensor up;       // (out, rank) or (out, rank, 1, 1)
  double scale;        // alpha / rank (PEFT: its scaling)
};

// A LoRA file read and checked: every key named, every shape fitting `shape_of(target)` (empty
// when the model has no such weight). FormatError / IoError name the file and key.
std::vector<LoraLayer> read_lora(const std::string &path, const LoraNames &names,
                                 const std::function<std::vector<int64_t>(const std::string &)> &shape_of);

// The merged set of one model and the base values that undo it.
class LoraWeights {
 public:
  // weight(target): the tensor the networks compute with for "<component>/<key>" (nullptr:
  // none). It is changed in place; CPU memory that is a read-only file mapping is made
  // copy-on-write first (the file is never written).
  LoraWeights(LoraNames names, std::function<at::Tensor *(const std::string &)> weight);
  // Merge `set` in place of the merged one ({} restores the base values bit for bit). Every file
  // is read and checked before any weight changes; an error changes nothing.
  void apply(const std::vector<LoraSpec> &set);
  bool empty() const { return names_.empty(); }

 private:
  LoraNames names_;
  std::function<at::Tensor *(const std::string &)> weight_;
  std::map<std::string, at::Tensor> backups_;  // target -> value before any LoRA (kept for the next swap)
  std::set<std::string> changed_;              // targets that differ from their backup now
};

// A textual-inversion embedding for the text encoder(s): component -> (n, D) float vectors.
// A1111 .safetensors ({"emb_params"}), diffusers ({token: vector}) or SDXL ({"clip_l",
// "clip_g"}); `token` is filled from a diffusers file when empty (else the file's stem).
// widths: component -> hidden size (one entry, or two for SDXL). FormatError names the file.
std::map<std::string, at::Tensor> read_embedding(const std::string &path, const std::map<std::string, int64_t> &widths,
                                                 std::string &token);

// Many readers (requests) or one writer (a LoRA swap, an embedding); a waiting writer goes
// before new readers, so that a stream of requests cannot starve a swap.
class ReadWriteLock {
 public:
  void lock_shared() {
    std::unique_lock<std::mutex> guard(mutex_);
    cond_.wait(guard, [&] { return !writer_ && writers_waiting_ == 0; });
    ++readers_;
  }
  void unlock_shared() {
    std::lock_guard<std::mutex> guard(mutex_);
    if (--readers_ == 0) cond_.notify_all();
  }
  void lock() {
    std::unique_lock<std::mutex> guard(mutex_);
    ++writers_waiting_;
    cond_.wait(guard, [&] { return !writer_ && readers_ == 0; });
    --writers_waiting_;
    writer_ = true;
  }
  void unlock() {
    std::lock_guard<std::mutex> guard(mutex_);
    writer_ = false;
    cond_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cond_;
  int readers_ = 0, writers_waiting_ = 0;
  bool writer_ = false;
};

// Makes the CPU memory of `t` writable (a private file mapping becomes copy-on-write); a no-op
// for other memory and devices.
void make_writable(const at::Tensor &t);

}  // namespace sde
