#include "engine_meta.h"

#include <cmath>
#include <initializer_list>

#include "errors.h"
#include "util.h"

namespace sde {
namespace {

constexpr int kMaxDepth = 16;

class Checker {
 public:
  explicit Checker(const std::string &where) : where_(where) {}

  [[noreturn]] void fail(const std::string &key, const std::string &rule) const {
    throw FormatError(where_ + ": " + key + " " + rule);
  }

  // No key twice in any object, at most kMaxDepth nested arrays and objects.
  void structure(const Json &v, const std::string &key, int depth) const {
    if (!v.is_array() && !v.is_object()) return;
    if (depth > kMaxDepth) fail(key, "nests deeper than " + std::to_string(kMaxDepth) + " levels");
    if (v.is_array()) {
      for (const auto &item : v.array()) structure(item, key + "[]", depth + 1);
      return;
    }
    if (!v.duplicate_keys().empty()) fail(key + "." + v.duplicate_keys()[0], "is given twice");
    for (const auto &[name, item] : v.members()) structure(item, key.empty() ? name : key + "." + name, depth + 1);
  }

  const Json &object(const Json &parent, const std::string &name, const std::string &key) const {
    const Json *v = parent.find(name);
    if (!v) fail(key, "is missing");
    if (!v->is_object()) fail(key, "must be an object");
    return *v;
  }

  // A present, non-null member, or nullptr.
  static const Json *optional(const Json &parent, const std::string &name) {
    const Json *v = parent.find(name);
    return v && !v->is_null() ? v : nullptr;
  }

  const std::string &string(const Json &parent, const std::string &name, const std::string &key) const {
    const Json *v = parent.find(name);
    if (!v) fail(key, "is missing");
    if (!v->is_string()) fail(key, "must be a string");
    return v->str();
  }

  void one_of(const std::string &value, std::initializer_list<const char *> allowed, const std::string &key) const {
    std::string list;
    for (const char *a : allowed) {
      if (value == a) return;
      list += std::string(list.empty() ? "" : ", ") + "\"" + a + "\"";
    }
    fail(key, "must be one of " + list + ", got \"" + value + "\"");
  }

  int64_t integer(const Json &v, int64_t lo, int64_t hi, const std::string &key) const {
    if (!v.is_integer() || v.integer() < lo || v.integer() > hi)
      fail(key, "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v.integer();
  }

  int64_t integer(const Json &parent, const std::string &name, int64_t lo, int64_t hi, const std::string &key) const {
    const Json *v = parent.find(name);
    if (!v) fail(key, "is missing");
    return integer(*v, lo, hi, key);
  }

  void finite(const Json &v, const std::string &key) const {
    if (!v.is_number() || !std::isfinite(v.number())) fail(key, "must be a finite number");
  }

  // A plain file or folder name inside the engine folder: no separator, not "." or "..", not hidden.
  void plain_name(const std::string &name, const std::string &key) const {
    if (name.empty() || name[0] == '.' || name.find('/') != std::string::npos || name.find('\0') != std::string::npos)
      fail(key, "must name a file in the engine folder (no '/', not hidden), got \"" + name + "\"");
  }

  void scheduler(const Json &s, const std::string &key) const {
    if (const Json *v = optional(s, "num_train_timesteps")) integer(*v, 2, 100000, key + ".num_train_timesteps");
    if (const Json *v = optional(s, "steps_offset")) integer(*v, 0, 1000, key + ".steps_offset");
    for (const char *name : {"beta_start", "beta_end", "clip_sample_range", "sigma_min", "sigma_max"})
      if (const Json *v = optional(s, name)) finite(*v, key + "." + name);
    for (const char *name : {"clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "use_karras_sigmas",
                             "use_exponential_sigmas", "lower_order_final", "euler_at_final", "skip_prk_steps"})
      if (const Json *v = optional(s, name); v && !v->is_bool()) fail(key + "." + name, "must be a boolean");
    for (const char *name : {"beta_schedule", "prediction_type", "timestep_spacing", "final_sigmas_type", "solver_type",
                             "sampler", "_class_name"})
      if (const Json *v = optional(s, name); v && !v->is_string()) fail(key + "." + name, "must be a string");
    if (const Json *v = optional(s, "prediction_type"))
      one_of(v->str(), {"epsilon", "v_prediction", "sample"}, key + ".prediction_type");
  }

  void network(const Json &net, const std::string &key) const {
    std::string package = string(net, "package", key + ".package");
    plain_name(package, key + ".package");
    if (package.size() < 5 || package.compare(package.size() - 4, 4, ".pt2") != 0)
      fail(key + ".package", "must be a .pt2 file, got \"" + package + "\"");
    one_of(string(net, "component", key + ".component"), {"text_encoder", "text_encoder_2", "unet", "vae"},
           key + ".component");
    const std::string &prefix = string(net, "prefix", key + ".prefix");
    const Json &constants = object(net, "constants", key + ".constants");
    for (const auto &[fqn, shape] : constants.members()) {
      std::string where = key + ".constants." + fqn;
      if (fqn.size() <= prefix.size() || fqn.compare(0, prefix.size(), prefix) != 0)
        fail(where, "must start with the prefix \"" + prefix + "\"");
      if (!shape.is_array() || shape.array().size() > 8) fail(where, "must be a shape: at most 8 integers");
      for (const auto &d : shape.array()) integer(d, 0, 2147483647, where);
    }
    if (const Json *ldm = net.find("ldm")) {
      if (!ldm->is_object()) fail(key + ".ldm", "must be an object");
      for (const auto &[fqn, sources] : ldm->members()) {
        std::string where = key + ".ldm." + fqn;
        if (!constants.find(fqn)) fail(where, "names no constant of the network");
        if (!sources.is_array() || sources.array().empty()) fail(where, "must be a non-empty array of [key, transform]");
        for (const auto &source : sources.array()) {
          if (!source.is_array() || source.array().size() != 2 || !source.array()[0].is_string() ||
              !source.array()[1].is_string())
            fail(where, "must hold [key, transform] pairs of strings");
          one_of(source.array()[1].str(), {"", "q", "k", "v", "transpose"}, where + " transform");
        }
      }
    }
    if (const Json *v = net.find("compile_s"); v && !v->is_number()) fail(key + ".compile_s", "must be a number");
    // static_shape (export/aoti.py ATTEMPTS): the first input's only shape, null when dynamic.
    if (const Json *v = optional(net, "static_shape")) {
      if (!v->is_array() || v->array().empty() || v->array().size() > 8)
        fail(key + ".static_shape", "must be null or a shape: 1 to 8 integers");
      for (const auto &d : v->array()) integer(d, 1, 2147483647, key + ".static_shape");
    }
  }

 private:
  std::string where_;
};

}  // namespace

void check_engine_json(const Json &engine, const std::string &where) {
  Checker c(where);
  if (!engine.is_object()) c.fail("the document", "must be an object");
  c.structure(engine, "", 1);
  if (c.integer(engine, "format", 0, 1000000, "format") != kFormatVersion)
    c.fail("format", "is " + std::to_string(engine.at("format").integer()) + ", this library reads " +
                         std::to_string(kFormatVersion) + " (rebuild the engine)");
  c.string(engine, "torch_version", "torch_version");
  c.string(engine, "cpu_capability", "cpu_capability");
  c.one_of(c.string(engine, "device", "device"), {"cpu", "cuda"}, "device");
  c.one_of(c.string(engine, "dtype", "dtype"), {"fp32", "fp16", "bf16"}, "dtype");
  c.integer(engine, "latent_multiple", 1, 64, "latent_multiple");
  c.integer(engine, "max_batch", 1, 4096, "max_batch");
  c.integer(engine, "max_latent", 1, 65536, "max_latent");
  c.integer(engine, "max_prompt_windows", 1, 4096, "max_prompt_windows");

  const Json &config = c.object(engine, "config", "config");
  const Json &vae = c.object(config, "vae", "config.vae");
  if (const Json *v = Checker::optional(vae, "latent_channels")) c.integer(*v, 1, 64, "config.vae.latent_channels");
  if (const Json *v = Checker::optional(vae, "block_out_channels")) {
    if (!v->is_array() || v->array().empty() || v->array().size() > 8)
      c.fail("config.vae.block_out_channels", "must be 1 to 8 integers");
    for (const auto &d : v->array()) c.integer(d, 1, 65536, "config.vae.block_out_channels");
  }
  if (const Json *v = Checker::optional(vae, "scaling_factor")) {
    c.finite(*v, "config.vae.scaling_factor");
    if (v->number() <= 0) c.fail("config.vae.scaling_factor", "must be > 0");
  }
  if (const Json *v = Checker::optional(vae, "shift_factor")) c.finite(*v, "config.vae.shift_factor");
  const Json &unet = c.object(config, "unet", "config.unet");
  if (const Json *v = Checker::optional(unet, "in_channels")) c.integer(*v, 1, 1024, "config.unet.in_channels");
  if (const Json *v = Checker::optional(unet, "sample_size")) c.integer(*v, 1, 4096, "config.unet.sample_size");
  c.scheduler(c.object(config, "scheduler", "config.scheduler"), "config.scheduler");

  const Json &networks = c.object(engine, "networks", "networks");
  for (const auto &[name, net] : networks.members()) {
    c.one_of(name, {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}, "networks key");
    if (!net.is_object()) c.fail("networks." + name, "must be an object");
    c.network(net, "networks." + name);
  }
  for (const char *name : {"text_encoder", "unet", "vae_decoder", "vae_encoder"})
    if (!networks.find(name)) c.fail(std::string("networks.") + name, "is missing");

  if (const Json *lora = engine.find("lora")) {  // LoRA module name -> "<component>/<key>" (lora.h)
    if (!lora->is_object()) c.fail("lora", "must be an object");
    for (const auto &[name, target] : lora->members()) {
      std::string where = "lora." + name;
      if (!target.is_string()) c.fail(where, "must be a string \"<component>/<key>\"");
      const std::string &t = target.str();
      size_t slash = t.find('/');
      if (slash == std::string::npos || slash + 1 == t.size()) c.fail(where, "must be \"<component>/<key>\"");
      c.one_of(t.substr(0, slash), {"unet", "text_encoder", "text_encoder_2"}, where + " component");
    }
  }
  if (const Json *single = engine.find("single_file")) {
    if (!single->is_object()) c.fail("single_file", "must be an object");
    c.string(*single, "family", "single_file.family");
    c.one_of(c.string(*single, "default_prediction_type", "single_file.default_prediction_type"),
             {"epsilon", "v_prediction"}, "single_file.default_prediction_type");
    const Json &schedulers = c.object(*single, "schedulers", "single_file.schedulers");
    for (const char *name : {"epsilon", "v_prediction"})
      c.scheduler(c.object(schedulers, name, std::string("single_file.schedulers.") + name),
                  std::string("single_file.schedulers.") + name);
    for (const char *name : {"tokenizer", "tokenizer_2"})
      if (single->find(name)) c.plain_name(c.string(*single, name, std::string("single_file.") + name),
                                           std::string("single_file.") + name);
  }
}

Json read_engine_json(const std::string &engine_dir) {
  std::string path = engine_dir + "/engine.json";
  if (!is_file(path)) throw IoError("engine folder has no engine.json: " + engine_dir);
  Json engine = Json::read_file(path);
  check_engine_json(engine, path);
  return engine;
}

}  // namespace sde
