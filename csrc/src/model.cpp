#include "model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Version.h>
#include <c10/core/InferenceMode.h>
#include <dirent.h>
#include <sys/stat.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "engine_meta.h"
#include "errors.h"
#include "names.h"
#include "util.h"
#include "safetensors.h"
#include "single_file.h"

namespace sde {
namespace {

constexpr int kFormatVersion = 3;  // export/aoti.py FORMAT_VERSION

std::vector<std::string> list_dir(const std::string &dir) {
  std::vector<std::string> out;
  if (DIR *d = opendir(dir.c_str())) {
    while (dirent *e = readdir(d)) {
      std::string name = e->d_name;
      if (name != "." && name != "..") out.push_back(name);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool ends_with(const std::string &s, const std::string &suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

// "2.13.0+cpu" -> "2.13.0"
std::string base_version(const std::string &v) { return v.substr(0, v.find('+')); }

std::string cache_root() {
  if (const char *dir = std::getenv("SDE_CACHE_DIR"); dir && *dir) return std::string(dir) + "/aoti";
  const char *home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/sdengine/aoti";
}

at::ScalarType dtype_of(const std::string &name, const std::string &where) {
  if (name == "fp32") return at::kFloat;
  if (name == "fp16") return at::kHalf;
  if (name == "bf16") return at::kBFloat16;
  throw FormatError(where + ": unknown dtype '" + name + "'");
}

// Why an engine cannot run here, or "" when it can.
std::string engine_mismatch(const Json &engine) {
  if (engine.get_number("format", 0) != kFormatVersion)
    return "it has format " + std::to_string(static_cast<int>(engine.get_number("format", 0))) + ", this library reads " +
           std::to_string(kFormatVersion);
  std::string built = base_version(engine.get_string("torch_version", "?"));
  if (built != torch_version()) return "it was built with torch " + built + " and this library links torch " + torch_version();
  std::string device = engine.get_string("device", "?");
  if (device == "cpu") {
    std::string cap = engine.get_string("cpu_capability", "");
    if (!cap.empty() && cap != at::get_cpu_capability())
      return "it was compiled for " + cap + " CPUs and this CPU runs " + at::get_cpu_capability();
  } else if (device == "cuda") {
    if (!at::hasCUDA()) return "it is a CUDA engine and this torch has no CUDA device";
  } else {
    return "unknown device '" + device + "'";
  }
  return "";
}

// Which weight a constant of a network reads: "<component>/<key>", trying transformers 5's
// CLIP layout (no "text_model." prefix) when the usual key is absent.
const at::Tensor *find_weight(const WeightMap &weights, const std::string &component, const std::string &key) {
  auto it = weights.find(component + "/" + key);
  if (it != weights.end()) return &it->second;
  const std::string prefix = "text_model.";
  if (key.rfind(prefix, 0) == 0) {
    it = weights.find(component + "/" + key.substr(prefix.size()));
    if (it != weights.end()) return &it->second;
  }
  return nullptr;
}

// Why `weights` do not fit the engine's constants, or "".
std::string weights_mismatch(const Json &engine, const WeightMap &weights, const WeightMap &buffers) {
  for (const auto &[name, net] : engine.at("networks").members()) {
    std::string component = net.at("component").str(), prefix = net.at("prefix").str();
    for (const auto &[fqn, shape_json] : net.at("constants").members()) {
      std::string key = fqn.substr(prefix.size());
      const at::Tensor *w = find_weight(weights, component, key);
      if (!w) {
        auto b = buffers.find(name + "/" + fqn);
        if (b != buffers.end()) continue;
        return "the weights have no '" + component + "/" + key + "'";
      }
      std::vector<int64_t> shape;
      for (const auto &d : shape_json.array()) shape.push_back(d.integer());
      if (w->sizes().vec() != shape) {
        std::string got, want;
        for (auto d : w->sizes()) got += std::to_string(d) + ",";
        for (auto d : shape) want += std::to_string(d) + ",";
        return "'" + component + "/" + key + "' has shape (" + got + ") but the engine expects (" + want + ")";
      }
    }
  }
  return "";
}

WeightMap read_buffers(const std::string &engine_dir) {
  WeightMap out;
  std::string path = engine_dir + "/buffers.safetensors";
  if (!is_file(path)) return out;
  SafetensorsFile file(path);
  for (const auto &name : file.names()) out[name] = file.tensor(name);
  return out;
}

sde_sampler sampler_of_config(const std::string &name, std::string *canonical) {
  try {
    *canonical = canonical_sampler(name, nullptr);
    sde_sampler s;
    parse_sampler(*canonical, &s, nullptr);
    return s;
  } catch (const InvalidArgument &) {
    return SDE_SAMPLER_DEFAULT;
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------

Network::Network(const std::string &engine_dir, const std::string &name, const Json &info, int num_runners,
                 int device_index)
    : name_(name) {
  component_ = info.at("component").str();
  prefix_ = info.at("prefix").str();
  for (const auto &[fqn, shape_json] : info.at("constants").members()) {
    std::vector<int64_t> shape;
    for (const auto &d : shape_json.array()) shape.push_back(d.integer());
    constants_.emplace_back(fqn, shape);
  }
  std::string package = engine_dir + "/" + info.at("package").str();
  if (!is_file(package)) throw IoError("engine package missing: " + package);
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        package, "model", /*run_single_threaded=*/false, static_cast<size_t>(num_runners),
        static_cast<c10::DeviceIndex>(device_index));
  } catch (const c10::Error &e) {
    throw FormatError("cannot load the compiled package " + package + ": " + e.what_without_backtrace());
  } catch (const std::exception &e) {
    throw FormatError("cannot load the compiled package " + package + ": " + e.what());
  }
  // engine.json lists what torch.export saw; the package keeps only the constants it uses.
  std::vector<std::string> used = loader_->get_constant_fqns();
  std::sort(used.begin(), used.end());
  std::vector<std::pair<std::string, std::vector<int64_t>>> kept;
  for (auto &c : constants_)
    if (std::binary_search(used.begin(), used.end(), c.first)) kept.push_back(std::move(c));
  constants_.swap(kept);
}

Network::~Network() = default;

void Network::load_weights(const WeightMap &weights, const WeightMap &buffers, at::ScalarType dtype,
                           at::Device device) {
  std::unordered_map<std::string, at::Tensor> constants;
  for (const auto &[fqn, shape] : constants_) {
    std::string key = fqn.substr(prefix_.size());
    const at::Tensor *w = find_weight(weights, component_, key);
    if (!w) {
      auto b = buffers.find(name_ + "/" + fqn);
      if (b == buffers.end()) throw FormatError("the weights have no '" + component_ + "/" + key + "' (" + name_ + ")");
      w = &b->second;
    }
    if (w->sizes().vec() != shape)
      throw FormatError("'" + component_ + "/" + key + "' has a shape that does not fit the engine");
    // Integer buffers (position ids) keep their dtype; floating weights take the engine's.
    at::ScalarType want = at::isFloatingType(w->scalar_type()) ? dtype : w->scalar_type();
    at::Tensor t = w->to(device, want).contiguous();  // no copy when it already fits
    constants[fqn] = t;
    keep_alive_.push_back(t);
  }
  try {
    loader_->load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
  } catch (const c10::Error &e) {
    throw FormatError("the compiled " + name_ + " refused its weights: " + e.what_without_backtrace());
  }
}

at::Tensor Network::run(const std::vector<at::Tensor> &inputs) const { return run_all(inputs)[0]; }

std::vector<at::Tensor> Network::run_all(const std::vector<at::Tensor> &inputs) const {
  std::vector<at::Tensor> out;
  try {
    out = loader_->run(inputs);
  } catch (const c10::Error &e) {
    throw DeviceError("the compiled " + name_ + " failed: " + e.what_without_backtrace());
  } catch (const std::exception &e) {
    throw DeviceError("the compiled " + name_ + " failed: " + e.what());
  }
  if (out.empty()) throw DeviceError("the compiled " + name_ + " returned no output");
  return out;
}

// ---------------------------------------------------------------------------
// Reading checkpoints
// ---------------------------------------------------------------------------

namespace {

// Weights of a diffusers folder, by "<component>/<key>".
WeightMap read_diffusers_weights(const std::string &model_dir) {
  WeightMap weights;
  for (const std::string component : {"text_encoder", "text_encoder_2", "unet", "vae"}) {
    std::string dir = model_dir + "/" + component;
    if (component == "text_encoder_2" && !is_dir(dir)) continue;  // SDXL only
    if (!is_dir(dir)) throw IoError("model folder has no " + component + "/: " + dir);
    std::vector<std::string> files, variants;
    for (const auto &name : list_dir(dir)) {
      if (!ends_with(name, ".safetensors")) continue;
      bool variant = name.find(".fp16.") != std::string::npos || name.find(".bf16.") != std::string::npos;
      (variant ? variants : files).push_back(name);
    }
    if (files.empty()) files = variants;  // only a reduced-precision variant was saved
    if (files.empty()) throw IoError(dir + " holds no .safetensors weights");
    for (const auto &name : files) {
      SafetensorsFile file(dir + "/" + name);
      for (const auto &key : file.names()) weights[component + "/" + key] = file.tensor(key);
    }
  }
  return weights;
}

// "epsilon" or "v_prediction" for the names users and file headers write; "" for others.
std::string normalize_prediction_type(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  if (name == "epsilon" || name == "eps") return "epsilon";
  if (name == "v" || name == "v_prediction" || name == "v-prediction") return "v_prediction";
  return "";
}

std::string checked_prediction_type(const char *name) {
  std::string out = normalize_prediction_type(name);
  if (out.empty())
    throw InvalidArgument(std::string("prediction_type must be \"epsilon\" or \"v_prediction\", got \"") + name + "\"");
  return out;
}

// What a single file predicts, as sdengine.convert.detect_config decides: the caller's
// prediction_type, else the header's SAI Model Spec (modelspec.prediction_type, or a
// modelspec.architecture naming the SD2 512 or 768-v model), else a "v_pred" key, else
// the family's default (SD2 text-to-image: v_prediction).
std::string single_file_prediction_type(const SafetensorsFile &file, const Json &single_file,
                                        const sde_model_params &params) {
  if (params.prediction_type) return checked_prediction_type(params.prediction_type);
  if (std::string declared = normalize_prediction_type(file.metadata("modelspec.prediction_type")); !declared.empty())
    return declared;
  std::string architecture = file.metadata("modelspec.architecture");
  if (architecture.rfind("stable-diffusion-v2-768-v", 0) == 0) return "v_prediction";
  if (architecture.rfind("stable-diffusion-v2-512", 0) == 0) return "epsilon";
  if (file.contains("v_pred")) return "v_prediction";
  return single_file.get_string("default_prediction_type", "epsilon");
}

// The cached engine that runs here and fits the checkpoint: `fit(engine)` gives the weights
// as that engine names them, or throws FormatError saying why they do not fit.
std::string find_engine(const std::function<WeightMap(const Json &)> &fit, const std::string &what) {
  std::string root = cache_root();
  std::string reasons;
  for (const auto &entry : list_dir(root)) {
    std::string dir = root + "/" + entry, meta = dir + "/engine.json";
    if (entry[0] == '.' || !is_file(meta)) continue;
    try {
      Json engine = read_engine_json(dir);  // checked (engine_meta.h): a corrupt entry is skipped
      std::string why = engine_mismatch(engine);
      if (why.empty()) why = weights_mismatch(engine, fit(engine), read_buffers(dir));
      if (why.empty()) return dir;
      reasons += "\n  " + entry + ": " + why;
    } catch (const Error &e) {
      reasons += "\n  " + entry + ": " + e.what();
    }
  }
  throw FormatError("no compiled engine in " + root + " fits " + what + " (build one with `sdengine export aoti " +
                    what + "`, or set engine_dir)" +
                    (reasons.empty() ? std::string(": the cache is empty") : ":" + reasons));
}

ModelSource load_diffusers_folder(const std::string &model_dir, const sde_model_params &params) {
  ModelSource source;
  source.weights = read_diffusers_weights(model_dir);
  source.vae = Json::read_file(model_dir + "/vae/config.json");
  source.unet = Json::read_file(model_dir + "/unet/config.json");
  source.where = model_dir + "/scheduler/scheduler_config.json";
  source.scheduler = Json::read_file(source.where);
  source.engine_dir = params.engine_dir ? params.engine_dir
                                        : find_engine([&](const Json &) { return source.weights; }, model_dir);
  source.tokenizer_dir = params.tokenizer_dir ? params.tokenizer_dir : model_dir + "/tokenizer";
  if (params.tokenizer_2_dir) source.tokenizer_2_dir = params.tokenizer_2_dir;
  else if (is_dir(model_dir + "/tokenizer_2")) source.tokenizer_2_dir = model_dir + "/tokenizer_2";
  return source;
}

ModelSource load_single_file(const std::string &path, const sde_model_params &params) {
  SafetensorsFile file(path);
  ModelSource source;
  if (params.engine_dir) {
    source.engine_dir = params.engine_dir;
  } else {
    source.engine_dir = find_engine([&](const Json &engine) { return single_file_weights(file, engine); }, path);
  }
  Json engine = read_engine_json(source.engine_dir);
  try {
    source.weights = single_file_weights(file, engine);
  } catch (const FormatError &e) {
    throw FormatError(path + " does not fit the engine " + source.engine_dir + ": " + e.what());
  }
  const Json &single = engine.at("single_file");
  const Json &config = engine.at("config");
  source.vae = config.at("vae");
  source.unet = config.at("unet");
  std::string prediction_type = single_file_prediction_type(file, single, params);
  source.scheduler = single.at("schedulers").at(prediction_type);
  source.where = source.engine_dir + "/engine.json (single_file.schedulers." + prediction_type + ")";
  source.zero_snr = file.contains("ztsnr");
  if (params.tokenizer_dir) {
    source.tokenizer_dir = params.tokenizer_dir;
  } else if (const Json *tokenizer = single.find("tokenizer"); tokenizer && tokenizer->is_string()) {
    source.tokenizer_dir = source.engine_dir + "/" + tokenizer->str();
  } else {
    throw InvalidArgument("the engine " + source.engine_dir + " has no tokenizer for single files (its text encoder "
                          "does not use CLIP's vocabulary): set tokenizer_dir");
  }
  if (params.tokenizer_2_dir) {
    source.tokenizer_2_dir = params.tokenizer_2_dir;
  } else if (const Json *tokenizer = single.find("tokenizer_2"); tokenizer && tokenizer->is_string()) {
    source.tokenizer_2_dir = source.engine_dir + "/" + tokenizer->str();
  }
  return source;
}

}  // namespace

ModelSource load_path(const std::string &path, const sde_model_params &params) {
  if (is_dir(path)) return load_diffusers_folder(path, params);
  if (!is_file(path)) throw IoError("model not found: " + path + " (give a diffusers folder or a .safetensors file)");
  if (!ends_with(path, ".safetensors"))
    throw FormatError(path + ": the native runtime reads diffusers folders and single-file .safetensors checkpoints; "
                             "load pickled .ckpt files from Python (sdengine.load(path, backend='native'))");
  return load_single_file(path, params);
}

ModelSource load_tensors(WeightMap weights, const std::string &model_dir, const std::string &config_json,
                         const sde_model_params &params) {
  ModelSource source;
  source.weights = std::move(weights);
  if (!config_json.empty()) {
    Json cfg = Json::parse(config_json, "config_json");
    source.vae = cfg.at("vae");
    source.unet = cfg.at("unet");
    source.scheduler = cfg.at("scheduler");
    source.where = "config_json";
  } else {
    source.vae = Json::read_file(model_dir + "/vae/config.json");
    source.unet = Json::read_file(model_dir + "/unet/config.json");
    source.where = model_dir + "/scheduler/scheduler_config.json";
    source.scheduler = Json::read_file(source.where);
  }
  std::string what = model_dir.empty() ? std::string("these weights") : model_dir;
  source.engine_dir = params.engine_dir ? params.engine_dir
                                        : find_engine([&](const Json &) { return source.weights; }, what);
  if (params.tokenizer_dir) {
    source.tokenizer_dir = params.tokenizer_dir;
  } else if (!model_dir.empty()) {
    source.tokenizer_dir = model_dir + "/tokenizer";
  } else {
    throw InvalidArgument("tokenizer_dir is required when the model is given as tensors without a model folder");
  }
  if (params.tokenizer_2_dir) source.tokenizer_2_dir = params.tokenizer_2_dir;
  else if (!model_dir.empty() && is_dir(model_dir + "/tokenizer_2")) source.tokenizer_2_dir = model_dir + "/tokenizer_2";
  return source;
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

Model::Model(ModelSource source, const sde_model_params &params) : dtype_(at::kFloat) {
  // -- configs ----------------------------------------------------------------
  const Json &vae_cfg = source.vae, &unet_cfg = source.unet, &sched_cfg = source.scheduler;
  info_.scheduler = SchedulerConfig::from_json(sched_cfg, source.where);
  if (source.zero_snr) info_.scheduler.rescale_betas_zero_snr = true;
  if (params.prediction_type) info_.scheduler.prediction_type = checked_prediction_type(params.prediction_type);
  std::string sampler = sched_cfg.get_string("sampler", sched_cfg.get_string("_class_name", "pndm"));
  info_.default_sampler = sampler_of_config(sampler, &info_.default_sampler_name);
  if (info_.default_sampler_name.empty()) info_.default_sampler_name = sampler;
  info_.latent_channels = static_cast<int>(vae_cfg.get_number("latent_channels", 4));
  info_.inpainting = static_cast<int>(unet_cfg.get_number("in_channels", 4)) == 2 * info_.latent_channels + 1;
  if (const Json *blocks = vae_cfg.find("block_out_channels"); blocks && blocks->is_array())
    info_.downscale = 1 << (static_cast<int>(blocks->array().size()) - 1);
  info_.scaling_factor = vae_cfg.get_number("scaling_factor", 0.18215);
  if (const Json *shift = vae_cfg.find("shift_factor"); shift && shift->is_number()) {
    info_.has_shift = true;
    info_.shift_factor = shift->number();
  }
  info_.default_size = static_cast<int>(unet_cfg.get_number("sample_size", 64)) * info_.downscale;

  // -- engine ------------------------------------------------------------------
  engine_dir_ = source.engine_dir;
  engine_ = read_engine_json(engine_dir_);
  if (std::string why = engine_mismatch(engine_); !why.empty())
    throw FormatError("engine " + engine_dir_ + " cannot run here: " + why);
  const WeightMap &weights = source.weights;
  WeightMap buffers = read_buffers(engine_dir_);
  if (std::string why = weights_mismatch(engine_, weights, buffers); !why.empty())
    throw FormatError("engine " + engine_dir_ + " does not fit these weights: " + why);
  dtype_ = dtype_of(engine_.get_string("dtype", "fp32"), engine_dir_ + "/engine.json");
  std::string device = engine_.get_string("device", "cpu");
  device_ = device == "cuda" ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(params.device_index, 0)))
                             : at::Device(at::kCPU);
  info_.latent_multiple = static_cast<int>(engine_.get_number("latent_multiple", 1));

  const Json &nets = engine_.at("networks");
  info_.sdxl = nets.find("text_encoder_2") != nullptr;

  // -- tokenizers: their ids must index the text encoders' embeddings ------------------
  auto check_vocabulary = [&](const Tokenizer &tokenizer, const std::string &component, const std::string &dir,
                              const char *param) {
    const at::Tensor *embedding = find_weight(weights, component, "text_model.embeddings.token_embedding.weight");
    if (embedding && embedding->dim() == 2 && tokenizer.max_id() >= embedding->size(0))
      throw FormatError("the tokenizer in " + dir + " has ids up to " + std::to_string(tokenizer.max_id()) + " but the " +
                        component + " embeds " + std::to_string(embedding->size(0)) +
                        " tokens: give the model's own tokenizer (" + param + ")");
  };
  tokenizer_ = Tokenizer::from_folder(source.tokenizer_dir);
  check_vocabulary(tokenizer_, "text_encoder", source.tokenizer_dir, "tokenizer_dir");
  if (info_.sdxl) {
    if (source.tokenizer_2_dir.empty())
      throw InvalidArgument("an SDXL model needs its second tokenizer: set tokenizer_2_dir");
    tokenizer_2_ = std::make_unique<Tokenizer>(Tokenizer::from_folder(source.tokenizer_2_dir));
    check_vocabulary(*tokenizer_2_, "text_encoder_2", source.tokenizer_2_dir, "tokenizer_2_dir");
  }

  // -- networks ----------------------------------------------------------------
  int runners = params.max_concurrency > 0 ? params.max_concurrency : 4;
  c10::InferenceMode guard;
  text_encoder_ = std::make_unique<Network>(engine_dir_, "text_encoder", nets.at("text_encoder"), runners, params.device_index);
  if (info_.sdxl)
    text_encoder_2_ = std::make_unique<Network>(engine_dir_, "text_encoder_2", nets.at("text_encoder_2"), runners,
                                                params.device_index);
  unet_ = std::make_unique<Network>(engine_dir_, "unet", nets.at("unet"), runners, params.device_index);
  vae_decoder_ = std::make_unique<Network>(engine_dir_, "vae_decoder", nets.at("vae_decoder"), runners, params.device_index);
  vae_encoder_ = std::make_unique<Network>(engine_dir_, "vae_encoder", nets.at("vae_encoder"), runners, params.device_index);
  for (Network *net : {text_encoder_.get(), text_encoder_2_.get(), unet_.get(), vae_decoder_.get(), vae_encoder_.get()})
    if (net) net->load_weights(weights, buffers, dtype_, device_);
}

Model::~Model() = default;

std::pair<at::Tensor, at::Tensor> Model::encode_text(const std::vector<std::string> &prompts) const {
  auto token_ids = [&](const Tokenizer &tokenizer) {
    std::vector<int64_t> ids;
    for (const auto &p : prompts) {
      auto row = tokenizer.encode_padded(p);
      ids.insert(ids.end(), row.begin(), row.end());
    }
    return at::tensor(ids, at::kLong).reshape({static_cast<int64_t>(prompts.size()), tokenizer.max_length()}).to(device_);
  };
  at::Tensor context = text_encoder_->run({token_ids(tokenizer_)}).to(at::kFloat);  // (B, 77, D)
  if (!info_.sdxl) return {context, at::Tensor()};
  // SDXL: both encoders' hidden states side by side; the second's pooled (projected) output.
  std::vector<at::Tensor> second = text_encoder_2_->run_all({token_ids(*tokenizer_2_)});
  return {at::cat({context, second.at(0).to(at::kFloat)}, -1), second.at(1).to(at::kFloat)};  // (B, 77, D1 + D2), (B, P)
}

at::Tensor Model::encode_image(const at::Tensor &image, std::vector<at::Generator> &generators) const {
  at::Tensor moments = vae_encoder_->run({image.to(device_, dtype_).contiguous()}).to(at::kFloat).cpu();
  auto mean_logvar = moments.chunk(2, 1);  // (1, C, h, w) each
  at::Tensor mean = mean_logvar[0], std_dev = at::exp(mean_logvar[1] * 0.5);
  std::vector<at::Tensor> latents;
  for (auto &g : generators) latents.push_back(mean + std_dev * at::randn(mean.sizes(), g, at::kFloat));
  at::Tensor out = at::cat(latents);  // (N, C, h, w)
  if (info_.has_shift) out = out - info_.shift_factor;
  return (out * info_.scaling_factor).to(device_);
}

at::Tensor Model::generate(const sde_gen_params &p, sde_sampler sampler, std::vector<uint64_t> &seeds) const {
  c10::InferenceMode guard;
  const ModelInfo &info = info_;
  int n = p.batch_size;
  int height = p.height ? p.height : info.default_size, width = p.width ? p.width : info.default_size;
  int cell = info.downscale * info.latent_multiple;
  if (height % cell || width % cell)
    throw InvalidArgument("this engine needs width and height that are multiples of " + std::to_string(cell) +
                          " (8 x the UNet's downsampling), got " + std::to_string(width) + "x" + std::to_string(height));
  int64_t h = height / info.downscale, w = width / info.downscale;
  if (std::max(h, w) > static_cast<int64_t>(engine_.get_number("max_latent", 512)))
    throw InvalidArgument("size " + std::to_string(width) + "x" + std::to_string(height) + " exceeds the engine's maximum");
  int steps = p.steps ? p.steps : 30;
  bool do_cfg = p.guidance_scale > 1.0f;
  double guidance = p.guidance_scale;
  if (n * (do_cfg ? 2 : 1) > static_cast<int>(engine_.get_number("max_batch", 64)))
    throw InvalidArgument("batch_size " + std::to_string(n) + " exceeds the engine's maximum batch");

  bool inpaint = p.mask_image != nullptr;
  if (inpaint && !info.inpainting)
    throw InvalidArgument("mask_image needs an inpainting model (a " + std::to_string(2 * info.latent_channels + 1) +
                          "-channel UNet)");
  if (info.inpainting && !inpaint) throw InvalidArgument("this is an inpainting model: give init_image and mask_image");
  double strength = p.strength > 0 ? p.strength : inpaint ? 1.0 : 0.8;
  // Inpainting at strength 1 starts from pure noise, as diffusers' (is_strength_max).
  bool init_for_sampler = p.init_image && (!inpaint || strength < 1.0);
  Plan plan = make_plan(sampler, p.schedule, steps, info.scheduler, init_for_sampler ? strength : 1.0);

  // -- text: [uncond, cond] -----------------------------------------------------------
  std::vector<std::string> prompts(static_cast<size_t>(n), p.prompt);
  auto [context, pooled] = encode_text(prompts);
  if (do_cfg) {
    at::Tensor neg_context, neg_pooled;
    if (info.sdxl && !p.negative_prompt) {  // SDXL's force_zeros_for_empty_prompt
      neg_context = at::zeros_like(context);
      neg_pooled = at::zeros_like(pooled);
    } else {
      std::vector<std::string> negatives(static_cast<size_t>(n), p.negative_prompt ? p.negative_prompt : "");
      std::tie(neg_context, neg_pooled) = encode_text(negatives);
    }
    context = at::cat({neg_context, context});  // (2N, 77, D)
    if (info.sdxl) pooled = at::cat({neg_pooled, pooled});
  }
  context = context.to(device_, dtype_);
  at::Tensor time_ids;  // SDXL micro-conditioning: (original size, crop top-left, target size)
  if (info.sdxl) {
    pooled = pooled.to(device_, dtype_);
    time_ids = at::tensor(std::vector<float>{static_cast<float>(height), static_cast<float>(width), 0.0f, 0.0f,
                                             static_cast<float>(height), static_cast<float>(width)})
                   .reshape({1, 6})
                   .repeat({context.size(0), 1})
                   .to(device_, dtype_);
  }

  // -- initial state: one CPU generator per image, as torch.Generator().manual_seed(seed + i);
  //    img2img draws each image's posterior sample before its noise (diffusers' order) --------
  std::vector<at::Generator> generators;
  for (int i = 0; i < n; ++i) {
    seeds.push_back(p.seed + static_cast<uint64_t>(i));
    generators.push_back(at::make_generator<at::CPUGeneratorImpl>(p.seed + static_cast<uint64_t>(i)));
  }
  at::Tensor image;  // (1, 3, H, W) in [-1, 1], as the Python pipeline: x / 255 * 2 - 1 in float32
  if (p.init_image) {
    at::Tensor pixels = at::from_blob(const_cast<uint8_t *>(p.init_image), {1, height, width, 3}, at::kByte);
    image = (pixels.permute({0, 3, 1, 2}).to(at::kFloat) / 255) * 2 - 1;
  }
  at::Tensor init_latents = init_for_sampler ? encode_image(image, generators) : at::Tensor();
  auto draw_noise = [&]() {
    std::vector<at::Tensor> parts;
    for (auto &g : generators) parts.push_back(at::randn({1, info.latent_channels, h, w}, g, at::kFloat));
    return at::cat(parts).to(device_);  // (N, C, h, w)
  };
  at::Tensor start = initial_state(plan, draw_noise(), init_latents);
  // Inpainting: the UNet also reads the mask and the masked image's latents (drawn after the noise).
  at::Tensor extra_channels;
  if (inpaint) {
    at::Tensor mask_bytes = at::from_blob(const_cast<uint8_t *>(p.mask_image), {1, 1, height, width}, at::kByte);
    at::Tensor mask = (mask_bytes >= 128).to(at::kFloat);  // (1, 1, H, W): 1 = repaint
    at::Tensor masked_latents = encode_image(image * (mask < 0.5), generators);  // (N, C, h, w)
    at::Tensor mask_latent = at::upsample_nearest2d(mask, {h, w}).expand({n, 1, h, w}).to(device_);
    extra_channels = at::cat({mask_latent, masked_latents}, 1);  // (N, 1 + C, h, w)
    if (do_cfg) extra_channels = at::cat({extra_channels, extra_channels});
    extra_channels = extra_channels.to(dtype_);
  }

  // -- the loop ---------------------------------------------------------------------
  auto model_fn = [&](const at::Tensor &x_in, double t) {
    at::Tensor x_batch = do_cfg ? at::cat({x_in, x_in}) : x_in;  // (2N, C, h, w)
    if (inpaint) x_batch = at::cat({x_batch.to(dtype_), extra_channels}, 1);  // (2N, 2C + 1, h, w)
    at::Tensor t_batch = at::full({x_batch.size(0)}, t, at::TensorOptions().dtype(at::kFloat).device(device_));
    std::vector<at::Tensor> inputs = {x_batch.to(dtype_).contiguous(), t_batch, context};
    if (info.sdxl) inputs.insert(inputs.end(), {pooled, time_ids});
    at::Tensor out = unet_->run(inputs).to(at::kFloat);
    if (!do_cfg) return out;
    auto halves = out.chunk(2);
    return halves[0] + (halves[1] - halves[0]) * guidance;  // uncond + scale * (cond - uncond)
  };
  const int evaluations = static_cast<int>(plan.timesteps.size());  // steps, or steps + 1 for PNDM
  auto on_step = [&](int step) {
    if (p.cancel && *p.cancel) throw Cancelled("cancelled by the cancel flag at step " + std::to_string(step + 1));
    if (p.progress && p.progress(p.progress_user, step + 1, evaluations) != 0)
      throw Cancelled("cancelled by the progress callback at step " + std::to_string(step + 1));
  };
  at::Tensor latents = sample(plan, info.scheduler, model_fn, start, draw_noise, on_step, p.eta);

  // -- decode -------------------------------------------------------------------------
  at::Tensor z = latents / info.scaling_factor;
  if (info.has_shift) z = z + info.shift_factor;
  at::Tensor decoded = vae_decoder_->run({z.to(dtype_).contiguous()}).to(at::kFloat);  // (N, 3, H, W)
  at::Tensor images = (decoded / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).cpu();
  return (images * 255).round().to(at::kByte).contiguous();  // (N, H, W, 3), half to even as numpy
}

}  // namespace sde
