#include "single_file.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "errors.h"

namespace sde {
namespace {

std::string shape_str(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + ")";
}

// A 1x1 convolution kernel (C, C, 1, 1) and a Linear weight (C, C) hold the same values.
std::vector<int64_t> without_unit_dims(at::IntArrayRef shape) {
  std::vector<int64_t> out = shape.vec();
  if (out.size() > 2 && std::all_of(out.begin() + 2, out.end(), [](int64_t d) { return d == 1; })) out.resize(2);
  return out;
}

}  // namespace

WeightMap single_file_weights(const SafetensorsFile &file, const Json &engine) {
  if (!engine.find("single_file"))
    throw FormatError("it predates single-file support; rebuild it with `sdengine export aoti`");
  WeightMap weights;
  for (const auto &[name, net] : engine.at("networks").members()) {
    const Json *ldm = net.find("ldm");
    std::string component = net.at("component").str(), prefix = net.at("prefix").str();
    for (const auto &[fqn, shape_json] : net.at("constants").members()) {
      const Json *sources = ldm ? ldm->find(fqn) : nullptr;
      if (!sources) continue;  // not a checkpoint weight: an engine buffer (checked later)
      std::vector<int64_t> shape;
      for (const auto &d : shape_json.array()) shape.push_back(d.integer());
      bool found = false;
      for (const auto &source : sources->array()) {
        const std::string &key = source.array().at(0).str(), &transform = source.array().at(1).str();
        if (!file.contains(key)) continue;
        at::Tensor t = file.tensor(key);
        if (transform == "q" || transform == "k" || transform == "v") {
          if (t.dim() < 1 || t.size(0) % 3)
            throw FormatError("'" + key + "' of shape " + shape_str(t.sizes()) + " is not a fused q, k, v projection");
          t = t.chunk(3, 0)[transform == "q" ? 0 : transform == "k" ? 1 : 2];
        } else if (transform == "transpose") {
          if (t.dim() != 2) throw FormatError("'" + key + "' of shape " + shape_str(t.sizes()) + " is not a matrix");
          t = t.t();
        } else if (!transform.empty()) {
          throw FormatError("engine.json names an unknown transform '" + transform + "'");
        }
        if (t.sizes().vec() != shape && without_unit_dims(t.sizes()) == without_unit_dims(shape)) t = t.reshape(shape);
        if (t.sizes().vec() != shape)
          throw FormatError("'" + key + "' has shape " + shape_str(t.sizes()) + " but the engine's " + component + "/" +
                            fqn.substr(prefix.size()) + " is " + shape_str(shape));
        weights[component + "/" + fqn.substr(prefix.size())] = t;
        found = true;
        break;
      }
      if (!found) {
        std::string wanted = sources->array().at(0).array().at(0).str();
        throw FormatError("the file has no '" + wanted + "'" + (sources->array().size() > 1 ? " (nor its variants)" : ""));
      }
    }
  }
  return weights;
}

}  // namespace sde
