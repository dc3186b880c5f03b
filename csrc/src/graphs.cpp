#include "graphs.h"

#include <cstdio>
#include <mutex>

#include "errors.h"

#ifdef SDE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sde {
namespace {

// A call that runs directly, with no graph: a CUDA capture that failed falls back to it.
class DirectCall : public Graph {
 public:
  explicit DirectCall(std::function<void()> fn) : fn_(std::move(fn)) {}
  void replay() override { fn_(); }

 private:
  std::function<void()> fn_;
};

// The CPU stand-in of a CUDA graph: it keeps the closure and runs it on every replay, and
// refuses a replay that overlaps another (two requests on one graph).
class StandInGraph : public Graph {
 public:
  explicit StandInGraph(std::function<void()> fn) : fn_(std::move(fn)) {}
  void replay() override {
    if (replaying_.exchange(true))
      throw Error(SDE_ERR_INTERNAL, "a graph was replayed by two requests at once (each instance's graphs are its own)");
    struct Done {
      std::atomic<bool> &flag;
      ~Done() { flag = false; }
    } done{replaying_};
    fn_();
  }

 private:
  std::function<void()> fn_;
  std::atomic<bool> replaying_{false};
};

class StandInCapturer : public Capturer {
 public:
  std::unique_ptr<Graph> capture(const std::function<void()> &fn) override {
    fn();  // this call's result, as the CUDA capturer's warm-up run
    return std::make_unique<StandInGraph>(fn);
  }
  std::shared_ptr<void> use_stream() override { return nullptr; }
  bool is_cuda() const override { return false; }
};

#ifdef SDE_WITH_CUDA

class CudaGraph : public Graph {
 public:
  at::cuda::CUDAGraph graph;
  void replay() override { graph.replay(); }  // on the current stream: the instance's
};

// One instance's CUDA graphs: its own stream (a capture needs a stream other than the default
// one, and requests on different instances then run side by side) and its own memory pool.
// The pool is shared by this instance's graphs, which never replay at once (one request at a
// time holds the instance): a graph's temporaries, allocated and freed inside its capture,
// may then be reused by another's; its results live in buffers allocated outside the captures.
class CudaCapturer : public Capturer {
 public:
  explicit CudaCapturer(at::Device device)
      : device_(device),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index())),
        pool_(at::cuda::graph_pool_handle()) {}

  std::unique_ptr<Graph> capture(const std::function<void()> &fn) override {
    c10::cuda::CUDAGuard device_guard(device_);
    c10::cuda::CUDAStreamGuard stream_guard(stream_);
    // The warm-up, and this call's result: lazy initialisation (AOTInductor's kernel loading,
    // cuBLAS handles and workspaces) happens here, outside the capture.
    fn();
    auto graph = std::make_unique<CudaGraph>();
    try {
      // Thread-local capture mode: other requests keep running (and allocating) on their own
      // streams while this thread captures.
      graph->graph.capture_begin(pool_, cudaStreamCaptureModeThreadLocal);
      try {
        fn();
      } catch (...) {
        try {
          graph->graph.capture_end();
        } catch (...) {
        }
        throw;
      }
      graph->graph.capture_end();
      return graph;
    } catch (const std::exception &e) {
      // The call ran (above); without a graph it still runs, only with more launches.
      static std::once_flag warned;
      std::string what = e.what();
      std::call_once(warned, [&] {
        std::fprintf(stderr, "sdengine: capturing a CUDA graph failed (%s); such calls run without a graph\n",
                     what.substr(0, 300).c_str());
      });
      cudaGetLastError();  // clear a non-sticky capture error
      return std::make_unique<DirectCall>(fn);
    }
  }

  std::shared_ptr<void> use_stream() override {
    struct Guards {
      c10::cuda::CUDAGuard device;
      c10::cuda::CUDAStreamGuard stream;
      Guards(at::Device d, c10::cuda::CUDAStream s) : device(d), stream(s) {}
    };
    return std::make_shared<Guards>(device_, stream_);
  }
  bool is_cuda() const override { return true; }

 private:
  at::Device device_;
  c10::cuda::CUDAStream stream_;
  at::cuda::MempoolId_t pool_;
};

#endif  // SDE_WITH_CUDA

}  // namespace

std::unique_ptr<Capturer> make_capturer(at::Device device) {
#ifdef SDE_WITH_CUDA
  if (device.is_cuda()) return std::make_unique<CudaCapturer>(device);
#endif
  if (device.is_cuda())
    throw DeviceError("this libsdengine was built without CUDA (its torch had none): it cannot run a CUDA engine");
  return std::make_unique<StandInCapturer>();
}

GraphCache::~GraphCache() { counters_.cached -= static_cast<int>(entries_.size()); }

Graphed *GraphCache::find(const std::string &key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return nullptr;
  order_.splice(order_.begin(), order_, it->second.second);  // most recently used
  return it->second.first.get();
}

Graphed *GraphCache::insert(const std::string &key, std::unique_ptr<Graphed> entry) {
  while (!order_.empty() && static_cast<int>(entries_.size()) >= capacity_) {
    entries_.erase(order_.back());
    order_.pop_back();
    counters_.cached -= 1;
    counters_.evictions += 1;
  }
  order_.push_front(key);
  Graphed *out = entry.get();
  entries_[key] = {std::move(entry), order_.begin()};
  counters_.cached += 1;
  return out;
}

void GraphCache::run(Graphed &entry) {
  if (!use_graphs_) {
    entry.fn();
    counters_.direct += 1;
    return;
  }
  if (!entry.graph) {
    entry.graph = capturer_.capture(entry.fn);
    bool recorded = dynamic_cast<DirectCall *>(entry.graph.get()) == nullptr;
    (recorded ? counters_.captures : counters_.failed) += 1;
    return;
  }
  entry.graph->replay();
  (dynamic_cast<DirectCall *>(entry.graph.get()) ? counters_.direct : counters_.replays) += 1;
}

}  // namespace sde
