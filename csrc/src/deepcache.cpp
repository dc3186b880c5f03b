#include "deepcache.h"

#include <c10/core/InferenceMode.h>

#include "errors.h"
#include "side_engine.h"

namespace sde {
namespace {

constexpr int kDeepCacheFormat = 1;  // export/aoti_deepcache.py DEEPCACHE_FORMAT

}  // namespace

DeepCacheEngine::DeepCacheEngine(const Model &model, int branch, const char *engine_dir)
    : model_(model), branch_(branch) {
  auto load = [&](const std::string &dir, const Json &meta) -> std::string {
    int built = static_cast<int>(meta.get_number("branch", -1));
    if (built != branch) return "it is for branch " + std::to_string(built);
    std::string why = side_engine_mismatch(meta, kDeepCacheFormat, {"unet_deep_store", "unet_deep_reuse"}, model, {});
    if (!why.empty()) return why;
    const Json &kept = meta.at("kept");
    channels_ = kept.at("channels").integer();
    downscale_ = kept.at("downscale").integer();
    if (channels_ < 1 || downscale_ < 1) return "its kept state's channels or downscale is not positive";
    c10::InferenceMode guard;
    const Json &nets = meta.at("networks");
    store_ = std::make_unique<Network>(dir, "unet_deep_store", nets.at("unet_deep_store"), model.instances(),
                                       model.device_index(), model.per_instance());
    reuse_ = std::make_unique<Network>(dir, "unet_deep_reuse", nets.at("unet_deep_reuse"), model.instances(),
                                       model.device_index(), model.per_instance());
    store_->load_weights(model.weights(), {}, model.dtype(), model.device());
    reuse_->load_weights(model.weights(), {}, model.dtype(), model.device());
    return "";
  };
  std::string reasons;
  if (find_side_engine(engine_dir, "deepcache", "deepcache_engine.json", load, &reasons).empty())
    throw FormatError("no compiled DeepCache engine for branch " + std::to_string(branch) +
                      " fits the model (build one with `sdengine export aoti MODEL --deepcache-branch " +
                      std::to_string(branch) + "`, or set engine_dir)" +
                      (reasons.empty() ? std::string(": the cache holds none") : ":" + reasons));
}

DeepCacheEngine::~DeepCacheEngine() = default;

std::pair<at::Tensor, at::Tensor> DeepCacheEngine::store(const std::vector<at::Tensor> &inputs, int instance) const {
  std::vector<at::Tensor> out = store_->run_all(inputs, instance);
  return {out.at(0), out.at(1)};
}

at::Tensor DeepCacheEngine::reuse(const std::vector<at::Tensor> &inputs, int instance) const {
  return reuse_->run(inputs, instance);
}

}  // namespace sde
