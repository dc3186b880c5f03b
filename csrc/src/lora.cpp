#include "lora.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <regex>
#include <shared_mutex>

#include "errors.h"
#include "json.h"
#include "model.h"
#include "safetensors.h"

namespace sde {
namespace {

// The part of a key after the module name -> its role (sdengine/lora.py _KOHYA_PARTS, _PEFT_PARTS).
const std::vector<std::pair<std::string, std::string>> kKohyaParts = {
    {"lora_down.weight", "down"}, {"lora_up.weight", "up"}, {"alpha", "alpha"}};
const std::vector<std::pair<std::string, std::string>> kPeftParts = {
    {"lora_linear_layer.down.weight", "down"}, {"lora_linear_layer.up.weight", "up"},
    {"lora.down.weight", "down"}, {"lora.up.weight", "up"},
    {"lora_A.weight", "down"}, {"lora_B.weight", "up"}, {"alpha", "alpha"}};
// Adapter kinds that are refused by name (sdengine/lora.py _UNSUPPORTED_PARTS).
const std::vector<std::pair<std::string, std::string>> kUnsupported = {
    {"lora_mid.weight", "LoCon with a Tucker-decomposed middle (lora_mid)"}, {"dora_scale", "DoRA"},
    {"lora_magnitude_vector", "DoRA"}, {"hada_w1_a", "LyCORIS LoHa"}, {"lokr_w1", "LyCORIS LoKr"},
    {"lora_B.bias", "a LoRA with a bias (lora_B.bias)"}, {"diff", "a full-weight difference (LyCORIS 'full')"},
    {"oft_blocks", "OFT"}};
const char *kComponents[] = {"unet", "text_encoder", "text_encoder_2"};

bool starts_with(const std::string &s, const std::string &p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string &s, const std::string &p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

std::string shape_str(const std::vector<int64_t> &shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

std::vector<int64_t> without_unit_dims(std::vector<int64_t> s) {
  if (s.size() > 2 && std::all_of(s.begin() + 2, s.end(), [](int64_t d) { return d == 1; })) s.resize(2);
  return s;
}

std::string layout_of(const std::vector<std::string> &keys, const std::string &path) {
  if (keys.empty()) throw FormatError(path + ": no tensors: not a LoRA file");
  bool kohya = true, peft = true;
  std::string odd;
  for (const auto &k : keys) {
    bool is_kohya = starts_with(k, "lora_unet_") || starts_with(k, "lora_te_") || starts_with(k, "lora_te1_") ||
                    starts_with(k, "lora_te2_");
    bool is_peft = false;
    for (const char *c : kComponents) is_peft |= starts_with(k, std::string(c) + ".");
    kohya &= is_kohya;
    peft &= is_peft;
    if (!is_kohya && !is_peft && odd.empty()) odd = k;
  }
  if (kohya) return "kohya";
  bool has_peft_part = false;
  for (const auto &k : keys)
    for (const auto &[part, role] : kPeftParts)
      if (role != "alpha" && ends_with(k, "." + part)) has_peft_part = true;
  if (peft && has_peft_part) return "peft";
  throw FormatError(path + ": not a LoRA layout sdengine reads; key '" + (odd.empty() ? keys[0] : odd) +
                    "' fits neither kohya / A1111 (lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* with "
                    ".lora_down.weight, .lora_up.weight, .alpha) nor diffusers / PEFT (unet.* / text_encoder.* / "
                    "text_encoder_2.* with .lora_A.weight, .lora_B.weight)");
}

// (module, part) of a key.
std::pair<std::string, std::string> split_key(const std::string &key, const std::string &layout) {
  if (layout == "kohya") {
    size_t dot = key.find('.');
    return dot == std::string::npos ? std::make_pair(key, std::string()) : std::make_pair(key.substr(0, dot), key.substr(dot + 1));
  }
  std::vector<std::string> parts;
  for (const auto &p : kPeftParts) parts.push_back(p.first);
  for (const auto &p : kUnsupported) parts.push_back(p.first);
  std::sort(parts.begin(), parts.end(), [](const auto &a, const auto &b) { return a.size() > b.size(); });
  for (const auto &part : parts)
    if (ends_with(key, "." + part)) return {key.substr(0, key.size() - part.size() - 1), part};
  return {key, ""};
}

// PEFT's rank_pattern / alpha_pattern: the first pattern matching the end of the module path.
const Json *pattern_value(const Json *patterns, const std::string &module) {
  if (!patterns || !patterns->is_object()) return nullptr;
  for (const auto &[pattern, value] : patterns->members()) {
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?(" + pattern + ")"))) return &value;
    } catch (const std::regex_error &) {
      continue;
    }
  }
  return nullptr;
}

double scalar_of(const at::Tensor &t) { return t.to(at::kDouble).reshape({}).item<double>(); }

}  // namespace

void make_writable(const at::Tensor &t) {
  if (!t.device().is_cpu() || t.nbytes() == 0) return;
  long page = sysconf(_SC_PAGESIZE);
  auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  uintptr_t first = begin / page * page, last = (begin + t.nbytes() + page - 1) / page * page;
  // On a MAP_PRIVATE file mapping this makes the pages copy-on-write; on heap memory it is a no-op.
  if (mprotect(reinterpret_cast<void *>(first), last - first, PROT_READ | PROT_WRITE) != 0)
    throw IoError(std::string("cannot make a weight writable: ") + std::strerror(errno));
}

std::vector<LoraLayer> read_lora(const std::string &path, const LoraNames &names,
                                 const std::function<std::vector<int64_t>(const std::string &)> &shape_of) {
  if (!ends_with(path, ".safetensors"))
    throw FormatError(path + ": the C runtime reads LoRAs as .safetensors files (load pickled files from Python)");
  SafetensorsFile file(path);
  std::vector<std::string> keys = file.names();
  std::sort(keys.begin(), keys.end());
  std::string layout = layout_of(keys, path);
  const auto &roles = layout == "kohya" ? kKohyaParts : kPeftParts;

  std::map<std::string, std::map<std::string, std::string>> modules;  // module -> role -> key
  for (const auto &key : keys) {
    auto [module, part] = split_key(key, layout);
    for (const auto &[name, what] : kUnsupported)
      if (part == name || starts_with(part, name + "."))
        throw FormatError(path + ": key '" + key + "' belongs to " + what + ", which sdengine does not merge");
    std::string role;
    for (const auto &[p, r] : roles)
      if (p == part) role = r;
    if (role.empty()) throw FormatError(path + ": unexpected key '" + key + "' in a " + layout + " LoRA");
    auto &slot = modules[module];
    if (slot.count(role))
      throw FormatError(path + ": '" + key + "' and '" + slot[role] + "' are both the " + role + " weight of '" +
                        module + "'");
    slot[role] = key;
  }

  Json metadata;  // PEFT: diffusers' lora_adapter_metadata, {"<component>.<setting>": value}
  if (std::string raw = file.metadata("lora_adapter_metadata"); layout == "peft" && !raw.empty())
    metadata = Json::parse(raw, path + ": lora_adapter_metadata");

  std::vector<LoraLayer> layers;
  std::map<std::string, std::string> seen;
  for (const auto &[module, parts] : modules) {
    auto found = names.find(module);
    if (found == names.end())
      throw FormatError(path + ": the model has no layer '" + module + "' (key '" + parts.begin()->second +
                        "'): a LoRA for another architecture?");
    const std::string &target = found->second;
    if (seen.count(target))
      throw FormatError(path + ": '" + module + "' and '" + seen[target] + "' both name the weight " + target);
    seen[target] = module;
    for (const char *role : {"down", "up"})
      if (!parts.count(role)) throw FormatError(path + ": '" + module + "' has no " + role + " weight");
    std::vector<int64_t> down = file.shape(parts.at("down")), up = file.shape(parts.at("up"));
    if ((down.size() != 2 && down.size() != 4) || up.size() != down.size())
      throw FormatError(path + ": '" + parts.at("down") + "' " + shape_str(down) + " and '" + parts.at("up") + "' " +
                        shape_str(up) + " are not a linear or convolution LoRA pair");
    if (up[1] != down[0])
      throw FormatError(path + ": mismatched ranks in '" + module + "': '" + parts.at("down") + "' has rank " +
                        std::to_string(down[0]) + " " + shape_str(down) + " but '" + parts.at("up") + "' has rank " +
                        std::to_string(up[1]) + " " + shape_str(up));
    if (up.size() == 4 && (up[2] != 1 || up[3] != 1))
      throw FormatError(path + ": '" + parts.at("up") + "' has a " + shape_str({up[2], up[3]}) +
                        " kernel; sdengine merges LoRA up weights with 1x1 kernels only");
    std::vector<int64_t> delta = down, expected = shape_of(target);
    delta[0] = up[0];
    if (expected.empty())
      throw FormatError(path + ": the engine holds no weight " + target + " (for '" + module + "')");
    if (delta != expected && without_unit_dims(delta) != without_unit_dims(expected))
      throw FormatError(path + ": '" + module + "' (key '" + parts.at("down") + "') gives a " + shape_str(delta) +
                        " update but the weight " + target + " is " + shape_str(expected));
    double rank = static_cast<double>(down[0]), alpha = 0;
    bool has_alpha = false;
    if (parts.count("alpha")) {
      at::Tensor a = file.tensor(parts.at("alpha"));
      if (a.numel() != 1) throw FormatError(path + ": '" + parts.at("alpha") + "' is not one number");
      alpha = scalar_of(a);
      has_alpha = true;
    }
    std::string component = target.substr(0, target.find('/'));
    bool rslora = false;
    if (metadata.is_object()) {
      std::string relative = module.substr(module.find('.') + 1);
      if (!has_alpha) {
        if (const Json *v = pattern_value(metadata.find(component + ".alpha_pattern"), relative); v && v->is_number()) {
          alpha = v->number();
          has_alpha = true;
        } else if (const Json *a = metadata.find(component + ".lora_alpha"); a && a->is_number()) {
          alpha = a->number();
          has_alpha = true;
        }
      }
      if (const Json *r = metadata.find(component + ".use_rslora"); r && r->is_bool()) rslora = r->boolean();
    }
    if (!has_alpha || alpha == 0) alpha = rank;  // kohya: absent or 0 means alpha = rank
    LoraLayer layer{target, module, file.tensor(parts.at("down")), file.tensor(parts.at("up")),
                    rslora ? alpha / std::sqrt(rank) : alpha / rank};
    for (const at::Tensor *t : {&layer.down, &layer.up})
      if (!at::isFloatingType(t->scalar_type()))
        throw FormatError(path + ": the weights of '" + module + "' are not floating point");
    layers.push_back(std::move(layer));
  }
  return layers;
}

LoraWeights::LoraWeights(LoraNames names, std::function<at::Tensor *(const std::string &)> weight)
    : names_(std::move(names)), weight_(std::move(weight)) {}

void LoraWeights::apply(const std::vector<LoraSpec> &set) {
  // 1. Read and check everything (nothing changes on an error).
  auto shape_of = [&](const std::string &target) {
    at::Tensor *w = weight_(target);
    return w ? w->sizes().vec() : std::vector<int64_t>{};
  };
  std::map<std::string, std::vector<std::tuple<at::Tensor, at::Tensor, double>>> terms;  // target -> (up, down, scale)
  for (const auto &spec : set) {
    if (!std::isfinite(spec.scale)) throw InvalidArgument(spec.path + ": the scale must be a finite number");
    for (auto &layer : read_lora(spec.path, names_, shape_of)) {
      at::Tensor *w = weight_(layer.target);
      auto opts = at::TensorOptions().dtype(at::kFloat).device(w->device());
      at::Tensor up = layer.up.reshape({layer.up.size(0), -1}).to(opts);
      at::Tensor down = layer.down.reshape({layer.down.size(0), -1}).to(opts);
      terms[layer.target].emplace_back(up, down, spec.scale * layer.scale);
    }
  }
  // 2. Merge: each touched weight from its base value, in float32, rounded once.
  std::set<std::string> touched = changed_;
  for (const auto &[target, _] : terms) touched.insert(target);
  std::set<std::string> done;
  try {
    for (const auto &target : touched) {
      at::Tensor &w = *weight_(target);
      if (!backups_.count(target)) backups_[target] = w.clone();
      const at::Tensor &base = backups_.at(target);
      make_writable(w);
      auto it = terms.find(target);
      if (it == terms.end()) {
        w.copy_(base);
        changed_.erase(target);
        continue;
      }
      at::Tensor acc = base.reshape({base.size(0), -1}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
      for (const auto &[up, down, scale] : it->second) acc.addmm_(up, down, 1.0, scale);
      w.copy_(acc.view(w.sizes()));
      changed_.insert(target);
    }
  } catch (...) {
    for (const auto &target : changed_) weight_(target)->copy_(backups_.at(target));  // never half a set
    changed_.clear();
    throw;
  }
}

std::map<std::string, at::Tensor> read_embedding(const std::string &path, const std::map<std::string, int64_t> &widths,
                                                 std::string &token) {
  if (!ends_with(path, ".safetensors"))
    throw FormatError(path + ": the C runtime reads embeddings as .safetensors files (load .pt files from Python)");
  SafetensorsFile file(path);
  std::vector<std::string> keys = file.names();
  std::map<std::string, at::Tensor> found;  // "clip_l" / "clip_g" / ""
  auto matrix = [&](const std::string &key) {
    at::Tensor t = file.tensor(key);
    if (!at::isFloatingType(t.scalar_type()) || (t.dim() != 1 && t.dim() != 2))
      throw FormatError(path + ": '" + key + "' is not a vector or an (n, width) matrix of floats");
    return t.reshape({-1, t.size(-1)}).to(at::kFloat);
  };
  if (file.contains("clip_l") || file.contains("clip_g")) {
    for (const char *k : {"clip_l", "clip_g"})
      if (!file.contains(k)) throw FormatError(path + ": an SDXL embedding needs both clip_l and clip_g; '" + k + "' is missing");
    found["clip_l"] = matrix("clip_l");
    found["clip_g"] = matrix("clip_g");
  } else if (file.contains("emb_params")) {
    found[""] = matrix("emb_params");
  } else if (keys.size() == 1) {  // diffusers: {token: vector}
    found[""] = matrix(keys[0]);
    if (token.empty()) token = keys[0];
  } else {
    throw FormatError(path + ": not a textual-inversion embedding sdengine reads (A1111 emb_params, diffusers "
                      "{token: vector}, SDXL clip_l + clip_g)");
  }
  if (token.empty()) {
    std::string stem = path.substr(path.find_last_of('/') + 1);
    token = stem.substr(0, stem.size() - std::strlen(".safetensors"));
  }
  std::map<std::string, at::Tensor> vectors;
  bool sdxl = widths.size() == 2;
  if (sdxl && found.count(""))
    throw FormatError(path + ": an embedding of one text encoder on an SDXL model, which needs clip_l and clip_g vectors");
  if (!sdxl && !found.count("")) throw FormatError(path + ": an SDXL embedding (clip_l + clip_g) on a model with one text encoder");
  std::map<std::string, std::string> source = sdxl ? std::map<std::string, std::string>{{"text_encoder", "clip_l"}, {"text_encoder_2", "clip_g"}}
                                                   : std::map<std::string, std::string>{{"text_encoder", ""}};
  int64_t count = -1;
  for (const auto &[component, key] : source) {
    const at::Tensor &t = found.at(key);
    int64_t width = widths.at(component);
    if (t.size(1) != width)
      throw FormatError(path + ": " + (key.empty() ? std::string("vectors") : key) + " has width " +
                        std::to_string(t.size(1)) + " but the " + component + " embeds tokens in " +
                        std::to_string(width) + " dimensions (an embedding for another model?)");
    if (count >= 0 && t.size(0) != count)
      throw FormatError(path + ": clip_l and clip_g hold different numbers of vectors");
    count = t.size(0);
    vectors[component] = t;
  }
  if (count < 1 || count > 75) throw FormatError(path + ": an embedding has 1 to 75 vectors, found " + std::to_string(count));
  return vectors;
}

// ---------------------------------------------------------------------------
// The model's entry points (declared in model.h)
// ---------------------------------------------------------------------------

at::Tensor *Model::weight(const std::string &component_key) {
  for (Network *net : {text_encoder_.get(), text_encoder_2_.get(), unet_.get()})
    if (net)
      if (at::Tensor *t = net->weight(component_key)) return t;
  return nullptr;
}

void Model::set_loras(const std::vector<LoraSpec> &set) {
  std::unique_lock<ReadWriteLock> writing(lock_);
  c10::InferenceMode guard;
  if (!loras_) {
    const Json *table = engine_.find("lora");
    if (!table || !table->is_object())
      throw FormatError("engine " + engine_dir_ + " has no LoRA name table; rebuild it with `sdengine export aoti`");
    LoraNames names;
    for (const auto &[name, target] : table->members()) names[name] = target.str();
    loras_ = std::make_unique<LoraWeights>(std::move(names), [this](const std::string &t) { return weight(t); });
  }
  loras_->apply(set);
}

std::string Model::load_embedding(const std::string &path, const std::string &token_in) {
  std::unique_lock<ReadWriteLock> writing(lock_);
  c10::InferenceMode guard;
  struct Encoder {
    Network *net;
    Tokenizer *tokenizer;
    std::string component;
  };
  std::vector<Encoder> encoders = {{text_encoder_.get(), &tokenizer_, "text_encoder"}};
  if (text_encoder_2_) encoders.push_back({text_encoder_2_.get(), tokenizer_2_.get(), "text_encoder_2"});
  std::map<std::string, int64_t> widths;
  for (const auto &e : encoders) {
    at::Tensor *table = e.net->weight(e.component + "/text_model.embeddings.token_embedding.weight");
    if (!table) throw FormatError("the engine's " + e.component + " has no token table");
    widths[e.component] = table->size(1);
  }
  std::string token = token_in;
  std::map<std::string, at::Tensor> vectors = read_embedding(path, widths, token);
  if (token.empty() || token.find_first_of(" \t\n") == 0 || token.find_last_of(" \t\n") == token.size() - 1)
    throw InvalidArgument("embedding token must be a non-empty string without surrounding spaces");
  // Check everything before changing anything.
  std::vector<std::pair<at::Tensor *, int64_t>> rows;  // (added-token table, first free row) per encoder
  for (const auto &e : encoders) {
    if (e.tokenizer->has_token(token))
      throw InvalidArgument(path + ": token '" + token + "' already exists in the tokenizer; give another token");
    at::Tensor *added = e.net->buffer("m.text_model.embeddings.added_tokens");
    if (!added) added = e.net->weight(e.component + "/text_model.embeddings.added_tokens");  // in-memory weights
    if (!added) throw FormatError("engine " + engine_dir_ + " has no added-token table; rebuild it with `sdengine export aoti`");
    int64_t used = added_tokens_[e.net == text_encoder_.get() ? "text_encoder" : "text_encoder_2"];
    int64_t count = vectors.at(e.component).size(0);
    if (used + count > added->size(0))
      throw InvalidArgument(path + ": the engine has room for " + std::to_string(added->size(0) - used) +
                            " more embedding vectors, this embedding has " + std::to_string(count));
    rows.emplace_back(added, used);
  }
  for (size_t i = 0; i < encoders.size(); ++i) {
    const Encoder &e = encoders[i];
    auto [added, first] = rows[i];
    const at::Tensor &v = vectors.at(e.component);
    make_writable(*added);
    added->narrow(0, first, v.size(0)).copy_(v);
    int64_t vocab = e.net->weight(e.component + "/text_model.embeddings.token_embedding.weight")->size(0);
    std::vector<int32_t> ids;
    for (int64_t r = 0; r < v.size(0); ++r) ids.push_back(static_cast<int32_t>(vocab + first + r));
    e.tokenizer->add_token(token, ids);
    added_tokens_[e.component] = first + v.size(0);
  }
  return token;
}

void Model::add_token(const std::string &token, const std::vector<int32_t> &ids, const std::vector<int32_t> &ids_2) {
  std::unique_lock<ReadWriteLock> writing(lock_);
  if (token.empty() || token.find_first_of(" \t\n") == 0 || token.find_last_of(" \t\n") == token.size() - 1)
    throw InvalidArgument("token must be a non-empty string without surrounding spaces");
  if (tokenizer_2_ && ids_2.empty()) throw InvalidArgument("an SDXL model needs the token's ids for both text encoders");
  if (!tokenizer_2_ && !ids_2.empty()) throw InvalidArgument("ids_2 is for SDXL's second text encoder; this model has one");
  for (const Tokenizer *t : {&tokenizer_, tokenizer_2_.get()})
    if (t && t->has_token(token)) throw InvalidArgument("token '" + token + "' already exists in the tokenizer");
  auto check = [&](const std::vector<int32_t> &list, Network *net, const std::string &component) {
    at::Tensor *table = net->weight(component + "/text_model.embeddings.token_embedding.weight");
    at::Tensor *added = net->buffer("m.text_model.embeddings.added_tokens");
    if (!added) added = net->weight(component + "/text_model.embeddings.added_tokens");
    int64_t limit = (table ? table->size(0) : 0) + (added ? added->size(0) : 0);
    for (int32_t id : list)
      if (id < 0 || id >= limit)
        throw InvalidArgument("token '" + token + "': id " + std::to_string(id) + " is outside the " + component +
                              "'s tables (" + std::to_string(limit) + " rows)");
  };
  check(ids, text_encoder_.get(), "text_encoder");
  if (tokenizer_2_) check(ids_2, text_encoder_2_.get(), "text_encoder_2");
  tokenizer_.add_token(token, ids);
  if (tokenizer_2_) tokenizer_2_->add_token(token, ids_2);
}

}  // namespace sde
