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
#include <cmath>
#include <cstdlib>

#include "errors.h"
#include "names.h"
#include "util.h"
#include "safetensors.h"

namespace sde {
namespace {

constexpr int kFormatVersion = 1;

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

at::Tensor Network::run(const std::vector<at::Tensor> &inputs) const {
  std::vector<at::Tensor> out;
  try {
    out = loader_->run(inputs);
  } catch (const c10::Error &e) {
    throw DeviceError("the compiled " + name_ + " failed: " + e.what_without_backtrace());
  } catch (const std::exception &e) {
    throw DeviceError("the compiled " + name_ + " failed: " + e.what());
  }
  if (out.empty()) throw DeviceError("the compiled " + name_ + " returned no output");
  return out[0];
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

WeightMap Model::read_diffusers_weights(const std::string &model_dir) {
  if (!is_dir(model_dir)) {
    if (is_file(model_dir))
      throw FormatError(model_dir + ": single-file checkpoints are not read by the native runtime yet; give a "
                                    "diffusers folder, or load the file from Python with backend='native'");
    throw IoError("model folder not found: " + model_dir);
  }
  WeightMap weights;
  for (const std::string component : {"text_encoder", "unet", "vae"}) {
    std::string dir = model_dir + "/" + component;
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

std::string find_engine(const WeightMap &weights) {
  std::string root = cache_root();
  std::string reasons;
  for (const auto &entry : list_dir(root)) {
    std::string dir = root + "/" + entry, meta = dir + "/engine.json";
    if (entry[0] == '.' || !is_file(meta)) continue;
    try {
      Json engine = Json::read_file(meta);
      std::string why = engine_mismatch(engine);
      if (why.empty()) why = weights_mismatch(engine, weights, read_buffers(dir));
      if (why.empty()) return dir;
      reasons += "\n  " + entry + ": " + why;
    } catch (const Error &e) {
      reasons += "\n  " + entry + ": " + e.what();
    }
  }
  throw FormatError("no compiled engine in " + root + " fits these weights (build one with `sdengine export aoti MODEL`" +
                    ", or set engine_dir)" + (reasons.empty() ? std::string(": the cache is empty") : ":" + reasons));
}

Model::Model(const std::string &model_dir, const WeightMap &weights, const std::string &config_json,
             const sde_model_params &params)
    : dtype_(at::kFloat) {
  // -- configs ----------------------------------------------------------------
  Json vae_cfg, unet_cfg, sched_cfg;
  std::string where;
  if (!config_json.empty()) {
    Json cfg = Json::parse(config_json, "config_json");
    vae_cfg = cfg.at("vae");
    unet_cfg = cfg.at("unet");
    sched_cfg = cfg.at("scheduler");
    where = "config_json";
  } else {
    vae_cfg = Json::read_file(model_dir + "/vae/config.json");
    unet_cfg = Json::read_file(model_dir + "/unet/config.json");
    where = model_dir + "/scheduler/scheduler_config.json";
    sched_cfg = Json::read_file(where);
  }
  info_.scheduler = SchedulerConfig::from_json(sched_cfg, where);
  std::string sampler = sched_cfg.get_string("sampler", sched_cfg.get_string("_class_name", "pndm"));
  info_.default_sampler = sampler_of_config(sampler, &info_.default_sampler_name);
  if (info_.default_sampler_name.empty()) info_.default_sampler_name = sampler;
  info_.latent_channels = static_cast<int>(vae_cfg.get_number("latent_channels", 4));
  if (const Json *blocks = vae_cfg.find("block_out_channels"); blocks && blocks->is_array())
    info_.downscale = 1 << (static_cast<int>(blocks->array().size()) - 1);
  info_.scaling_factor = vae_cfg.get_number("scaling_factor", 0.18215);
  if (const Json *shift = vae_cfg.find("shift_factor"); shift && shift->is_number()) {
    info_.has_shift = true;
    info_.shift_factor = shift->number();
  }
  info_.default_size = static_cast<int>(unet_cfg.get_number("sample_size", 64)) * info_.downscale;

  // -- tokenizer ------------------------------------------------------------------
  std::string tok_dir = params.tokenizer_dir ? params.tokenizer_dir : model_dir + "/tokenizer";
  if (!params.tokenizer_dir && model_dir.empty())
    throw InvalidArgument("tokenizer_dir is required when the model is given as tensors without a model folder");
  tokenizer_ = Tokenizer::from_folder(tok_dir);

  // -- engine ------------------------------------------------------------------
  engine_dir_ = params.engine_dir ? params.engine_dir : find_engine(weights);
  std::string meta_path = engine_dir_ + "/engine.json";
  if (!is_file(meta_path)) throw IoError("engine folder has no engine.json: " + engine_dir_);
  engine_ = Json::read_file(meta_path);
  if (std::string why = engine_mismatch(engine_); !why.empty())
    throw FormatError("engine " + engine_dir_ + " cannot run here: " + why);
  WeightMap buffers = read_buffers(engine_dir_);
  if (std::string why = weights_mismatch(engine_, weights, buffers); !why.empty())
    throw FormatError("engine " + engine_dir_ + " does not fit these weights: " + why);
  dtype_ = dtype_of(engine_.get_string("dtype", "fp32"), meta_path);
  std::string device = engine_.get_string("device", "cpu");
  device_ = device == "cuda" ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(params.device_index, 0)))
                             : at::Device(at::kCPU);
  info_.latent_multiple = static_cast<int>(engine_.get_number("latent_multiple", 1));

  int runners = params.max_concurrency > 0 ? params.max_concurrency : 4;
  const Json &nets = engine_.at("networks");
  c10::InferenceMode guard;
  text_encoder_ = std::make_unique<Network>(engine_dir_, "text_encoder", nets.at("text_encoder"), runners, params.device_index);
  unet_ = std::make_unique<Network>(engine_dir_, "unet", nets.at("unet"), runners, params.device_index);
  vae_decoder_ = std::make_unique<Network>(engine_dir_, "vae_decoder", nets.at("vae_decoder"), runners, params.device_index);
  text_encoder_->load_weights(weights, buffers, dtype_, device_);
  unet_->load_weights(weights, buffers, dtype_, device_);
  vae_decoder_->load_weights(weights, buffers, dtype_, device_);
}

Model::~Model() = default;

at::Tensor Model::encode_text(const std::vector<std::string> &prompts) const {
  std::vector<int64_t> ids;
  for (const auto &p : prompts) {
    auto row = tokenizer_.encode_padded(p);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  at::Tensor input = at::tensor(ids, at::kLong).reshape({static_cast<int64_t>(prompts.size()), tokenizer_.max_length()});
  return text_encoder_->run({input.to(device_)}).to(at::kFloat);  // (B, 77, D)
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

  Plan plan = make_plan(sampler, p.schedule, steps, info.scheduler);

  // -- text: [uncond, cond] -----------------------------------------------------------
  std::vector<std::string> prompts(static_cast<size_t>(n), p.prompt);
  at::Tensor context = encode_text(prompts);
  if (do_cfg) {
    std::vector<std::string> negatives(static_cast<size_t>(n), p.negative_prompt ? p.negative_prompt : "");
    context = at::cat({encode_text(negatives), context});  // (2N, 77, D)
  }
  context = context.to(device_, dtype_);

  // -- initial noise: one CPU generator per image, as torch.Generator().manual_seed(seed + i) --
  std::vector<at::Generator> generators;
  std::vector<at::Tensor> noise_parts;
  for (int i = 0; i < n; ++i) {
    seeds.push_back(p.seed + static_cast<uint64_t>(i));
    generators.push_back(at::make_generator<at::CPUGeneratorImpl>(p.seed + static_cast<uint64_t>(i)));
    noise_parts.push_back(at::randn({1, info.latent_channels, h, w}, generators.back(), at::kFloat));
  }
  at::Tensor noise = at::cat(noise_parts).to(device_);
  auto draw_noise = [&]() {
    std::vector<at::Tensor> parts;
    for (auto &g : generators) parts.push_back(at::randn({1, info.latent_channels, h, w}, g, at::kFloat));
    return at::cat(parts).to(device_);
  };

  // -- the loop ---------------------------------------------------------------------
  auto model_fn = [&](const at::Tensor &x_in, double t) {
    at::Tensor x_batch = do_cfg ? at::cat({x_in, x_in}) : x_in;  // (2N, C, h, w)
    at::Tensor t_batch = at::full({x_batch.size(0)}, t, at::TensorOptions().dtype(at::kFloat).device(device_));
    at::Tensor out = unet_->run({x_batch.to(dtype_).contiguous(), t_batch, context}).to(at::kFloat);
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
  at::Tensor latents = sample(plan, info.scheduler, model_fn, noise, draw_noise, on_step, p.eta);

  // -- decode -------------------------------------------------------------------------
  at::Tensor z = latents / info.scaling_factor;
  if (info.has_shift) z = z + info.shift_factor;
  at::Tensor decoded = vae_decoder_->run({z.to(dtype_).contiguous()}).to(at::kFloat);  // (N, 3, H, W)
  at::Tensor images = (decoded / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).cpu();
  return (images * 255).round().to(at::kByte).contiguous();  // (N, H, W, 3), half to even as numpy
}

}  // namespace sde
