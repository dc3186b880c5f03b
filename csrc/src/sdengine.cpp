// The C API: argument checks, and the one place where C++ exceptions become statuses.
#include "sdengine.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <new>
#include <sstream>
#include <string>

#include "controlnet.h"
#include "deepcache.h"
#include "errors.h"
#include "infotext.h"
#include "json.h"
#include "model.h"
#include "names.h"
#include "tokenizer.h"

struct sde_model {
  std::unique_ptr<sde::Model> impl;
};

struct sde_tokenizer {
  sde::Tokenizer impl;
};

namespace {

thread_local std::string last_error;

sde_status fail(sde_status status, const std::string &message) {
  last_error = message;
  return status;
}

// Runs body; maps every exception to a status and a message (none crosses the ABI).
template <typename Body>
sde_status guarded(const char *function, Body &&body) {
  try {
    body();
    return SDE_OK;
  } catch (const sde::Error &e) {
    return fail(e.status(), std::string(function) + ": " + e.what());
  } catch (const std::bad_alloc &) {
    return fail(SDE_ERR_OUT_OF_MEMORY, std::string(function) + ": out of memory");
  } catch (const c10::OutOfMemoryError &e) {
    return fail(SDE_ERR_OUT_OF_MEMORY, std::string(function) + ": out of memory: " + e.what_without_backtrace());
  } catch (const c10::Error &e) {
    return fail(SDE_ERR_DEVICE, std::string(function) + ": " + e.what_without_backtrace());
  } catch (const std::exception &e) {
    return fail(SDE_ERR_INTERNAL, std::string(function) + ": " + e.what());
  } catch (...) {
    return fail(SDE_ERR_INTERNAL, std::string(function) + ": unknown exception");
  }
}

// A failed allocation: CUDA's OutOfMemoryError, std::bad_alloc, or torch's CPU allocator
// giving up (a plain c10::Error, "DefaultCPUAllocator: can't allocate memory").
bool is_out_of_memory(const std::exception &e) {
  if (dynamic_cast<const c10::OutOfMemoryError *>(&e) || dynamic_cast<const std::bad_alloc *>(&e)) return true;
  if (const auto *c10_error = dynamic_cast<const c10::Error *>(&e))
    return std::string(c10_error->what_without_backtrace()).find("can't allocate memory") != std::string::npos;
  return std::string(e.what()).find("can't allocate memory") != std::string::npos;
}

std::string first_line(const std::exception &e) {
  const auto *c10_error = dynamic_cast<const c10::Error *>(&e);
  std::string text = c10_error ? c10_error->what_without_backtrace() : e.what();
  return text.substr(0, text.find('\n'));
}

#define SDE_REQUIRE(cond, message) \
  if (!(cond)) throw sde::InvalidArgument(message)

// The caps of sdengine/request.py: images per request, steps, pixels per side and per image.
constexpr int kMaxImages = 64, kMaxSteps = 1000, kMaxSide = 8192;
constexpr int64_t kMaxPixels = int64_t{4096} * 4096;

std::string number(double x) {
  std::ostringstream text;
  text << x;
  return text.str();
}

void check_utf8(const char *text, const char *name) {
  size_t size = std::strlen(text), bad = sde::utf8_error_offset(text, size);
  SDE_REQUIRE(bad == size, std::string(name) + " must be valid UTF-8 text (bad byte at offset " + std::to_string(bad) + ")");
}

}  // namespace

extern "C" {

const char *sde_version(void) { return "0.1.0"; }

const char *sde_status_str(sde_status status) {
  switch (status) {
    case SDE_OK: return "ok";
    case SDE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SDE_ERR_IO: return "I/O error";
    case SDE_ERR_FORMAT: return "bad file format";
    case SDE_ERR_OUT_OF_MEMORY: return "out of memory";
    case SDE_ERR_DEVICE: return "device error";
    case SDE_ERR_CANCELLED: return "cancelled";
    case SDE_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char *sde_last_error(void) { return last_error.c_str(); }

const char *sde_sampler_name(sde_sampler sampler) { return sde::sampler_name(sampler); }
const char *sde_schedule_name(sde_schedule schedule) { return sde::schedule_name(schedule); }

sde_status sde_sampler_from_str(const char *name, sde_sampler *sampler, sde_schedule *schedule) {
  return guarded("sde_sampler_from_str", [&] {
    SDE_REQUIRE(name, "name is NULL");
    SDE_REQUIRE(sampler, "sampler is NULL");
    sde::parse_sampler(name, sampler, schedule);
  });
}

sde_status sde_schedule_from_str(const char *name, sde_schedule *schedule) {
  return guarded("sde_schedule_from_str", [&] {
    SDE_REQUIRE(name, "name is NULL");
    SDE_REQUIRE(schedule, "schedule is NULL");
    *schedule = sde::parse_schedule(name);
  });
}

sde_status sde_sampler_parse(const char *name, sde_sampler *sampler, sde_schedule *schedule, sde_conventions *conventions) {
  return guarded("sde_sampler_parse", [&] {
    SDE_REQUIRE(name, "name is NULL");
    SDE_REQUIRE(sampler, "sampler is NULL");
    sde::parse_sampler(name, sampler, schedule, conventions);
  });
}

sde_status sde_schedule_parse(const char *name, sde_conventions conventions, sde_schedule *schedule) {
  return guarded("sde_schedule_parse", [&] {
    SDE_REQUIRE(name, "name is NULL");
    SDE_REQUIRE(schedule, "schedule is NULL");
    SDE_REQUIRE(conventions >= 0 && conventions < SDE_CONVENTIONS_COUNT,
                "conventions out of range: " + std::to_string(static_cast<int>(conventions)));
    *schedule = sde::parse_schedule(name, conventions);
  });
}

void sde_model_params_init(sde_model_params *params) {
  if (!params) return;
  std::memset(params, 0, sizeof(*params));
  params->engine_dir = nullptr;
  params->tokenizer_dir = nullptr;
  params->max_concurrency = 0;
  params->device_index = -1;
  params->prediction_type = nullptr;
  params->tokenizer_2_dir = nullptr;
  params->max_graphs = 0;
}

static void check_model_params(const sde_model_params *params) {
  SDE_REQUIRE(params->max_concurrency >= 0 && params->max_concurrency <= 256,
              "max_concurrency must be in [0, 256], got " + std::to_string(params->max_concurrency));
  SDE_REQUIRE(params->max_graphs <= 4096, "max_graphs must be at most 4096, got " + std::to_string(params->max_graphs));
}

sde_status sde_model_load(const char *path, const sde_model_params *params, sde_model **model) {
  if (model) *model = nullptr;
  return guarded("sde_model_load", [&] {
    SDE_REQUIRE(path, "path is NULL");
    SDE_REQUIRE(model, "model is NULL");
    sde_model_params defaults;
    sde_model_params_init(&defaults);
    const sde_model_params &p = params ? *params : defaults;
    check_model_params(&p);
    auto handle = std::make_unique<sde_model>();
    handle->impl = std::make_unique<sde::Model>(sde::load_path(path, p), p);
    *model = handle.release();
  });
}

sde_status sde_model_load_tensors(const sde_tensor_view *tensors, int count, const char *model_dir,
                                  const char *config_json, const sde_model_params *params, sde_model **model) {
  if (model) *model = nullptr;
  return guarded("sde_model_load_tensors", [&] {
    SDE_REQUIRE(model, "model is NULL");
    SDE_REQUIRE(tensors || count == 0, "tensors is NULL");
    SDE_REQUIRE(count >= 0, "count is negative");
    SDE_REQUIRE(model_dir || config_json, "give model_dir or config_json");
    sde_model_params defaults;
    sde_model_params_init(&defaults);
    const sde_model_params &p = params ? *params : defaults;
    check_model_params(&p);
    sde::WeightMap weights;
    for (int i = 0; i < count; ++i) {
      const sde_tensor_view &v = tensors[i];
      std::string where = "tensor " + std::to_string(i);
      SDE_REQUIRE(v.name, where + " has no name");
      SDE_REQUIRE(v.data || v.ndim == 0, where + " (" + v.name + ") has no data");
      SDE_REQUIRE(v.ndim >= 0 && v.ndim <= 8 && (v.shape || v.ndim == 0), where + " (" + v.name + ") has a bad shape");
      static const at::ScalarType dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kLong};
      SDE_REQUIRE(v.dtype >= 0 && v.dtype < SDE_DTYPE_COUNT, where + " (" + v.name + ") has an unknown dtype");
      SDE_REQUIRE(v.device_type >= 0 && v.device_type < SDE_DEVICE_COUNT,
                  where + " (" + v.name + ") has an unknown device_type");
      at::Device device = v.device_type == SDE_DEVICE_CUDA
                              ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(v.device_index))
                              : at::Device(at::kCPU);
      std::vector<int64_t> shape(v.shape, v.shape + v.ndim);
      weights[v.name] = at::from_blob(v.data, shape, at::TensorOptions().dtype(dtypes[v.dtype]).device(device));
    }
    auto handle = std::make_unique<sde_model>();
    handle->impl = std::make_unique<sde::Model>(
        sde::load_tensors(std::move(weights), model_dir ? model_dir : "", config_json ? config_json : "", p), p);
    *model = handle.release();
  });
}

void sde_model_free(sde_model *model) { delete model; }

int sde_model_default_size(const sde_model *model) { return model ? model->impl->info().default_size : 0; }

sde_status sde_model_get_stats(const sde_model *model, sde_model_stats *stats) {
  return guarded("sde_model_get_stats", [&] {
    SDE_REQUIRE(model, "model is NULL");
    SDE_REQUIRE(stats, "stats is NULL");
    model->impl->stats(stats);
  });
}

void sde_gen_params_init(sde_gen_params *params) {
  if (!params) return;
  std::memset(params, 0, sizeof(*params));
  params->prompt = nullptr;
  params->negative_prompt = nullptr;
  params->width = params->height = 0;
  params->steps = 0;
  params->guidance_scale = 7.5;
  params->seed = 0;
  params->batch_size = 1;
  params->sampler = SDE_SAMPLER_DEFAULT;
  params->schedule = SDE_SCHEDULE_DEFAULT;
  params->eta = SDE_ETA_DEFAULT;
  params->progress = nullptr;
  params->progress_user = nullptr;
  params->init_image = nullptr;
  params->mask_image = nullptr;
  params->strength = SDE_STRENGTH_DEFAULT;
  params->latents = nullptr;
  params->latents_user = nullptr;
  params->controls = nullptr;
  params->control_count = 0;
  params->conventions = SDE_CONVENTIONS_DEFAULT;
  params->latents_in = nullptr;
  params->subseed = 0;
  params->subseed_strength = 0.0;
  params->seed_resize_from_w = params->seed_resize_from_h = 0;
  params->eta_noise_seed_delta = 0;
  params->rng = SDE_RNG_CPU;
  params->prompt_syntax = SDE_PROMPT_SYNTAX_PLAIN;
  params->clip_skip = 0;
  params->prompt_windows = 0;
  params->deepcache_interval = 0;
  params->deepcache = nullptr;
  params->deepcache_branch = -1;
}

sde_status sde_model_generate(sde_model *model, const sde_gen_params *params, sde_image **images, int *count) {
  if (images) *images = nullptr;
  if (count) *count = 0;
  return guarded("sde_model_generate", [&] {
    SDE_REQUIRE(model, "model is NULL");
    SDE_REQUIRE(params, "params is NULL");
    SDE_REQUIRE(images, "images is NULL");
    SDE_REQUIRE(count, "count is NULL");
    const sde_gen_params &p = *params;
    // The same rules and words as sdengine/request.py (tests/test_validation.py checks both).
    SDE_REQUIRE(p.prompt, "prompt is NULL");
    check_utf8(p.prompt, "prompt");
    if (p.negative_prompt) check_utf8(p.negative_prompt, "negative_prompt");
    for (auto [name, value] : {std::pair<const char *, int>{"width", p.width}, {"height", p.height}})
      SDE_REQUIRE(value == 0 || (value >= 8 && value <= kMaxSide && value % 8 == 0),
                  std::string(name) + " must be a multiple of 8 in [8, " + std::to_string(kMaxSide) +
                      "] (0: the model's size), got " + std::to_string(value));
    SDE_REQUIRE(p.steps >= 0 && p.steps <= kMaxSteps,
                "steps must be an integer in [1, " + std::to_string(kMaxSteps) + "] (0: 30), got " + std::to_string(p.steps));
    SDE_REQUIRE(std::isfinite(p.guidance_scale), "guidance_scale must be a finite number, got " + number(p.guidance_scale));
    SDE_REQUIRE(p.batch_size >= 1 && p.batch_size <= kMaxImages,
                "batch_size must be an integer in [1, " + std::to_string(kMaxImages) + "], got " + std::to_string(p.batch_size));
    SDE_REQUIRE(p.seed <= UINT64_MAX - static_cast<uint64_t>(p.batch_size - 1),
                "seed must be an integer in [0, 2**64 - 1] (image i gets seed + i, so at most 2**64 - " +
                    std::to_string(p.batch_size) + " for " + std::to_string(p.batch_size) + " image(s)), got " +
                    std::to_string(p.seed));
    SDE_REQUIRE(p.sampler >= SDE_SAMPLER_DEFAULT && p.sampler < SDE_SAMPLER_COUNT,
                "sampler out of range: " + std::to_string(static_cast<int>(p.sampler)));
    SDE_REQUIRE(p.schedule >= 0 && p.schedule < SDE_SCHEDULE_COUNT,
                "schedule out of range: " + std::to_string(static_cast<int>(p.schedule)));
    SDE_REQUIRE(p.eta == SDE_ETA_DEFAULT || (std::isfinite(p.eta) && p.eta >= 0),
                "eta must be a finite number >= 0 (SDE_ETA_DEFAULT: the rules' default), got " + number(p.eta));
    SDE_REQUIRE(p.conventions >= 0 && p.conventions < SDE_CONVENTIONS_COUNT,
                "conventions out of range: " + std::to_string(static_cast<int>(p.conventions)));
    SDE_REQUIRE(p.rng >= 0 && p.rng < SDE_RNG_COUNT, "rng out of range: " + std::to_string(static_cast<int>(p.rng)));
    SDE_REQUIRE(p.prompt_syntax >= 0 && p.prompt_syntax < SDE_PROMPT_SYNTAX_COUNT,
                "prompt_syntax out of range: " + std::to_string(static_cast<int>(p.prompt_syntax)));
    // clip_skip's bound for this model's text encoders: Model::generate.
    SDE_REQUIRE(p.clip_skip >= 0 && p.clip_skip <= 1000,
                "clip_skip must be an integer in [0, 1000], got " + std::to_string(p.clip_skip));
    SDE_REQUIRE(p.prompt_windows >= 0 && p.prompt_windows <= 4096,
                "prompt_windows must be an integer in [0, 4096] (0: as the prompts need), got " +
                    std::to_string(p.prompt_windows));
    SDE_REQUIRE(p.deepcache_interval >= 0 && p.deepcache_interval <= 1000,
                "deepcache_interval must be an integer in [0, 1000] (0: off), got " + std::to_string(p.deepcache_interval));
    if (p.deepcache_interval > 0) {
      SDE_REQUIRE(p.deepcache, "deepcache_interval " + std::to_string(p.deepcache_interval) +
                                   " needs deepcache: a DeepCache engine loaded with sde_deepcache_load");
      SDE_REQUIRE(&p.deepcache->impl->model() == model->impl.get(), "deepcache was loaded for another model");
      SDE_REQUIRE(p.deepcache_branch < 0 || p.deepcache_branch == p.deepcache->impl->branch(),
                  "deepcache_branch is " + std::to_string(p.deepcache_branch) + " but deepcache was loaded for branch " +
                      std::to_string(p.deepcache->impl->branch()));
      SDE_REQUIRE(p.control_count == 0, "deepcache does not combine with controls (ControlNets) in the C++ loop: "
                                        "the Python API's backend='eager' runs both");
    } else {
      SDE_REQUIRE(!p.deepcache, "deepcache is set but deepcache_interval is 0: set the interval (DeepCache's "
                                "default is 3), or leave deepcache NULL");
    }
    SDE_REQUIRE(std::isfinite(p.subseed_strength) && p.subseed_strength >= 0 && p.subseed_strength <= 1,
                "subseed_strength must be a number in [0, 1], got " + number(p.subseed_strength));
    SDE_REQUIRE(p.subseed_strength == 0 || p.subseed <= UINT64_MAX - static_cast<uint64_t>(p.batch_size - 1),
                "subseed must be an integer in [0, 2**64 - 1] (image i gets subseed + i), got " + std::to_string(p.subseed));
    for (auto [name, value] : {std::pair<const char *, int>{"seed_resize_from_w", p.seed_resize_from_w},
                               {"seed_resize_from_h", p.seed_resize_from_h}})
      SDE_REQUIRE(value >= 0 && value <= kMaxSide && value % 8 == 0,
                  std::string(name) + " must be a multiple of 8 in [0, " + std::to_string(kMaxSide) + "] (0: off), got " +
                      std::to_string(value));
    SDE_REQUIRE((p.seed_resize_from_w == 0) == (p.seed_resize_from_h == 0),
                "seed_resize_from_w and seed_resize_from_h must both be set (or both 0)");
    SDE_REQUIRE(!p.mask_image || p.init_image, "mask_image needs init_image: the image to inpaint");
    // ControlNets: the same rules and words as sdengine/controlnet.py's Control.check
    SDE_REQUIRE(p.control_count >= 0 && p.control_count <= 8,
                "control_count must be an integer in [0, 8], got " + std::to_string(p.control_count));
    SDE_REQUIRE(p.controls || p.control_count == 0, "controls is NULL with a nonzero control_count");
    for (int i = 0; i < p.control_count; ++i) {
      const sde_control &c = p.controls[i];
      std::string where = "controls[" + std::to_string(i) + "]";
      SDE_REQUIRE(c.controlnet, where + ".controlnet is NULL");
      SDE_REQUIRE(c.image, where + ".image is NULL (the control map: width x height RGB at the request's size)");
      SDE_REQUIRE(std::isfinite(c.scale), where + ".scale must be a finite number, got " + number(c.scale));
      for (auto [name, value] : {std::pair<const char *, double>{"start", c.start}, {"end", c.end}})
        SDE_REQUIRE(std::isfinite(value) && value >= 0 && value <= 1,
                    where + "." + name + " must be in [0, 1], got " + number(value));
      SDE_REQUIRE(c.start <= c.end, where + ".start (" + number(c.start) + ") must not be after end (" + number(c.end) + ")");
      SDE_REQUIRE(&c.controlnet->impl->model() == model->impl.get(), where + ".controlnet was loaded for another model");
    }
    // strength as in Python (sdengine/request.py): a number in [0, 1] (the plan refuses one that
    // leaves no step), with init_image only; SDE_STRENGTH_DEFAULT: the mode's default.
    bool default_strength = p.strength == SDE_STRENGTH_DEFAULT;
    SDE_REQUIRE(default_strength || p.init_image,
                "strength applies to img2img and inpainting: give init_image (or leave strength at "
                "SDE_STRENGTH_DEFAULT)");
    SDE_REQUIRE(default_strength || (std::isfinite(p.strength) && p.strength >= 0 && p.strength <= 1),
                "strength must be a number in [0, 1] (SDE_STRENGTH_DEFAULT: the default), got " + number(p.strength));
    if (p.init_image) SDE_REQUIRE(p.width > 0 && p.height > 0, "init_image needs width and height (the image's size)");
    const sde::ModelInfo &info = model->impl->info();
    {
      int64_t width = p.width ? p.width : info.default_size, height = p.height ? p.height : info.default_size;
      SDE_REQUIRE(width * height <= kMaxPixels, "width x height must be at most " + std::to_string(kMaxPixels) +
                                                    " pixels (4096 x 4096), got " + std::to_string(width) + "x" +
                                                    std::to_string(height));
    }
    sde_sampler sampler = p.sampler;
    if (sampler == SDE_SAMPLER_DEFAULT) {
      sampler = info.default_sampler;
      SDE_REQUIRE(sampler != SDE_SAMPLER_DEFAULT,
                  "the model's default sampler '" + info.default_sampler_name + "' is not a sampler sdengine knows; set sampler");
    }
    std::vector<uint64_t> seeds;
    at::Tensor pixels;  // (N, H, W, 3) uint8
    try {
      pixels = model->impl->generate(p, sampler, seeds);
    } catch (const std::exception &e) {
      // Everything the request allocated is freed by the unwinding (its tensors are RAII);
      // what is left to do is to say which request did not fit.
      if (!is_out_of_memory(e)) throw;
      int width = p.width ? p.width : info.default_size, height = p.height ? p.height : info.default_size;
      throw sde::OutOfMemory("out of memory generating " + std::to_string(p.batch_size) + " image(s) of " +
                             std::to_string(width) + "x" + std::to_string(height) + " (batch_size " +
                             std::to_string(p.batch_size) + "): " + first_line(e) +
                             "; what the request allocated is freed: try a smaller size or batch");
    }
    int n = static_cast<int>(pixels.size(0)), height = static_cast<int>(pixels.size(1)),
        width = static_cast<int>(pixels.size(2));
    size_t bytes = static_cast<size_t>(height) * width * 3;
    auto *out = static_cast<sde_image *>(std::calloc(static_cast<size_t>(n), sizeof(sde_image)));
    if (!out) throw std::bad_alloc();
    for (int i = 0; i < n; ++i) {
      out[i].width = width;
      out[i].height = height;
      out[i].channels = 3;
      out[i].seed = seeds[static_cast<size_t>(i)];
      out[i].data = static_cast<uint8_t *>(std::malloc(bytes));
      if (!out[i].data) {
        sde_images_free(out, i);
        throw std::bad_alloc();
      }
      std::memcpy(out[i].data, pixels[i].data_ptr<uint8_t>(), bytes);
    }
    *images = out;
    *count = n;
  });
}

sde_status sde_generate(sde_model *model, const sde_gen_params *params, sde_image **images, int *count) {
  return sde_model_generate(model, params, images, count);
}

void sde_controlnet_params_init(sde_controlnet_params *params) {
  if (!params) return;
  std::memset(params, 0, sizeof(*params));
  params->model = nullptr;
  params->engine_dir = nullptr;
}

sde_status sde_controlnet_load(const char *path, const sde_controlnet_params *params, sde_controlnet **controlnet) {
  if (controlnet) *controlnet = nullptr;
  return guarded("sde_controlnet_load", [&] {
    SDE_REQUIRE(path, "path is NULL");
    SDE_REQUIRE(params, "params is NULL (set params->model: the model the ControlNet runs with)");
    SDE_REQUIRE(params->model, "params->model is NULL (the model the ControlNet runs with)");
    SDE_REQUIRE(controlnet, "controlnet is NULL");
    auto handle = std::make_unique<sde_controlnet>();
    handle->impl = std::make_unique<sde::ControlNet>(path, *params->model->impl, params->engine_dir);
    *controlnet = handle.release();
  });
}

void sde_controlnet_free(sde_controlnet *controlnet) { delete controlnet; }

void sde_deepcache_params_init(sde_deepcache_params *params) {
  if (!params) return;
  std::memset(params, 0, sizeof(*params));
  params->model = nullptr;
  params->branch = 0;
  params->engine_dir = nullptr;
}

sde_status sde_deepcache_load(const sde_deepcache_params *params, sde_deepcache **deepcache) {
  if (deepcache) *deepcache = nullptr;
  return guarded("sde_deepcache_load", [&] {
    SDE_REQUIRE(params, "params is NULL (set params->model: the model DeepCache runs with)");
    SDE_REQUIRE(params->model, "params->model is NULL (the model DeepCache runs with)");
    SDE_REQUIRE(params->branch >= 0, "branch must be an integer >= 0, got " + std::to_string(params->branch));
    SDE_REQUIRE(deepcache, "deepcache is NULL");
    auto handle = std::make_unique<sde_deepcache>();
    handle->impl = std::make_unique<sde::DeepCacheEngine>(*params->model->impl, params->branch, params->engine_dir);
    *deepcache = handle.release();
  });
}

void sde_deepcache_free(sde_deepcache *deepcache) { delete deepcache; }

void sde_control_init(sde_control *control) {
  if (!control) return;
  std::memset(control, 0, sizeof(*control));
  control->controlnet = nullptr;
  control->image = nullptr;
  control->scale = 1.0;
  control->start = 0.0;
  control->end = 1.0;
  control->guess_mode = 0;
}

sde_status sde_model_set_loras(sde_model *model, const sde_lora *loras, int count) {
  return guarded("sde_model_set_loras", [&] {
    SDE_REQUIRE(model, "model is NULL");
    SDE_REQUIRE(count >= 0 && (loras || count == 0), "loras is NULL with a nonzero count");
    std::vector<sde::LoraSpec> set;
    for (int i = 0; i < count; ++i) {
      SDE_REQUIRE(loras[i].path, "loras[" + std::to_string(i) + "].path is NULL");
      SDE_REQUIRE(std::isfinite(loras[i].scale), "loras[" + std::to_string(i) + "].scale is not a finite number");
      set.push_back({loras[i].path, loras[i].scale});
    }
    model->impl->set_loras(set);
  });
}

sde_status sde_model_load_embedding(sde_model *model, const char *path, const char *token) {
  return guarded("sde_model_load_embedding", [&] {
    SDE_REQUIRE(model, "model is NULL");
    SDE_REQUIRE(path, "path is NULL");
    model->impl->load_embedding(path, token ? token : "");
  });
}

void sde_images_free(sde_image *images, int count) {
  if (!images) return;
  for (int i = 0; i < count; ++i) std::free(images[i].data);
  std::free(images);
}

sde_status sde_tokenizer_load(const char *folder, sde_tokenizer **tokenizer) {
  if (tokenizer) *tokenizer = nullptr;
  return guarded("sde_tokenizer_load", [&] {
    SDE_REQUIRE(folder, "folder is NULL");
    SDE_REQUIRE(tokenizer, "tokenizer is NULL");
    *tokenizer = new sde_tokenizer{sde::Tokenizer::from_folder(folder)};
  });
}

void sde_tokenizer_free(sde_tokenizer *tokenizer) { delete tokenizer; }

sde_status sde_tokenizer_encode(const sde_tokenizer *tokenizer, const char *text, int32_t *ids, int capacity,
                                int *count) {
  return guarded("sde_tokenizer_encode", [&] {
    SDE_REQUIRE(tokenizer, "tokenizer is NULL");
    SDE_REQUIRE(text, "text is NULL");
    SDE_REQUIRE(count, "count is NULL");
    SDE_REQUIRE(capacity >= 0 && (ids || capacity == 0), "ids is NULL with a nonzero capacity");
    std::vector<int32_t> out = tokenizer->impl.tokens(text);
    for (size_t i = 0; i < out.size() && static_cast<int>(i) < capacity; ++i) ids[i] = out[i];
    *count = static_cast<int>(out.size());
  });
}

}  // extern "C"

sde_status sde_model_add_token(sde_model *model, const char *token, const int32_t *ids, int count, const int32_t *ids_2,
                               int count_2) {
  return guarded("sde_model_add_token", [&] {
    SDE_REQUIRE(model, "model is NULL");
    SDE_REQUIRE(token, "token is NULL");
    SDE_REQUIRE(ids && count > 0, "ids must hold count > 0 ids");
    SDE_REQUIRE((ids_2 == nullptr) == (count_2 == 0) && count_2 >= 0, "ids_2 and count_2 must be given together");
    check_utf8(token, "token");
    model->impl->add_token(token, std::vector<int32_t>(ids, ids + count),
                           ids_2 ? std::vector<int32_t>(ids_2, ids_2 + count_2) : std::vector<int32_t>());
  });
}

struct sde_infotext {
  sde::Infotext info;
};

sde_status sde_gen_params_from_infotext(const char *text, sde_gen_params *params, sde_infotext **info) {
  if (info) *info = nullptr;
  return guarded("sde_gen_params_from_infotext", [&] {
    SDE_REQUIRE(text, "text is NULL");
    SDE_REQUIRE(params, "params is NULL");
    SDE_REQUIRE(info, "info is NULL");
    check_utf8(text, "text");
    auto parsed = std::make_unique<sde_infotext>();
    parsed->info = sde::parse_infotext(text);
    sde_gen_params out = *params;
    sde::infotext_params(parsed->info, &out);  // all or nothing: *params changes only on success
    *params = out;
    *info = parsed.release();
  });
}

const char *sde_infotext_field(const sde_infotext *info, const char *key) {
  if (!info || !key) return nullptr;
  for (const auto &field : info->info.fields)
    if (field.first == key) return field.second.c_str();
  return nullptr;
}

void sde_infotext_free(sde_infotext *info) { delete info; }
