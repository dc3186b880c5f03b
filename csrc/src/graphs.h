// Calls captured once and replayed: CUDA graphs on CUDA, a counting stand-in on the CPU.
//
// A request's text encoding, each denoising step (UNet on the doubled batch, guidance, the
// sampler update) and its VAE decode are written as closures over fixed buffers: everything
// that changes from call to call (prompt ids, latents, the step's scalars, noise) is copied
// into those buffers before the call, and the results are read from them after. Such a
// closure can be captured as a CUDA graph and replayed for every later call of that shape.
//
// Each model instance (model.h: a request holds one for its whole run) has its own graph
// cache, its own CUDA stream and its own CUDA memory pool, shared by that instance's graphs:
// they never replay at the same time (one request at a time holds the instance), so they may
// reuse each other's temporaries; and no two threads ever replay one graph at once. The cache
// is bounded: past `capacity` graphs of a kind, the least recently used one is dropped.
//
// On the CPU the "capture" runs the closure and keeps it, and a "replay" runs it again: the
// same code path as on CUDA (one closure per shape, the same buffers and cache), observable
// through the counters (sde_model_get_stats) and tested without a GPU. The stand-in also
// checks that a graph is never replayed by two threads at once.
#pragma once

#include <ATen/Tensor.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>

#include "sdengine.h"

namespace sde {

// A recorded call.
class Graph {
 public:
  virtual ~Graph() = default;
  virtual void replay() = 0;
};

// How one model instance records calls. capture(fn) runs fn once (its effects are this call's
// result) and returns the recorded call.
class Capturer {
 public:
  virtual ~Capturer() = default;
  virtual std::unique_ptr<Graph> capture(const std::function<void()> &fn) = 0;
  // Makes the instance's stream current for a scope (CUDA; nothing on the CPU).
  virtual std::shared_ptr<void> use_stream() = 0;
  virtual bool is_cuda() const = 0;
};

// CUDA graphs on a CUDA device (when the library was built with CUDA), the stand-in elsewhere.
std::unique_ptr<Capturer> make_capturer(at::Device device);

// What each kind of graph has done since the model was loaded (summed over instances).
struct GraphCounters {
  std::atomic<int64_t> captures{0};   // calls recorded (each also ran once)
  std::atomic<int64_t> replays{0};    // calls replayed from a recorded graph
  std::atomic<int64_t> direct{0};     // calls run without a graph (graphs off, or after a failed capture)
  std::atomic<int64_t> failed{0};     // captures that failed (their call ran; the entry then runs directly)
  std::atomic<int64_t> evictions{0};  // entries dropped as the least recently used
  std::atomic<int> cached{0};         // entries held now
};

// A call with its fixed buffers, run through the cache: the first run of a new entry captures
// it (running it once), later runs replay it.
struct Graphed {
  virtual ~Graphed() = default;
  std::function<void()> fn;      // reads and writes only the entry's buffers
  std::unique_ptr<Graph> graph;  // null until captured
};

// One instance's entries of one kind, the least recently used dropped past `capacity` (>= 1).
// use_graphs false: every run calls fn directly (counted as `direct`), for comparisons.
class GraphCache {
 public:
  GraphCache(Capturer &capturer, GraphCounters &counters, int capacity, bool use_graphs)
      : capturer_(capturer), counters_(counters), capacity_(capacity < 1 ? 1 : capacity), use_graphs_(use_graphs) {}
  ~GraphCache();
  GraphCache(const GraphCache &) = delete;
  GraphCache &operator=(const GraphCache &) = delete;

  // The entry of `key`, or nullptr; a hit becomes the most recently used.
  Graphed *find(const std::string &key);
  // Adds an entry (dropping the least recently used one beyond capacity) and returns it.
  Graphed *insert(const std::string &key, std::unique_ptr<Graphed> entry);
  // Runs an entry: captures it the first time, replays it afterwards.
  void run(Graphed &entry);

 private:
  Capturer &capturer_;
  GraphCounters &counters_;
  int capacity_;
  bool use_graphs_;
  std::list<std::string> order_;  // most recently used first
  std::unordered_map<std::string, std::pair<std::unique_ptr<Graphed>, std::list<std::string>::iterator>> entries_;
};

}  // namespace sde
