// sdengine._C: Python bindings of libsdengine (the C API), plus the compiled-in sampler name
// table and schedules, exposed for the tests that compare them with the Python code.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <optional>
#include <stdexcept>

#include "engine_meta.h"
#include "errors.h"
#include "json.h"
#include "names.h"
#include "safetensors.h"
#include "sampling.h"
#include "sdengine.h"
#include "single_file.h"

namespace py = pybind11;

namespace {

// Raises the Python exception of a failed C call: ValueError (invalid argument, format),
// OSError (I/O), sdengine.OutOfMemoryError, sdengine._C.Cancelled, RuntimeError (device, internal).
void check(sde_status status) {
  if (status == SDE_OK) return;
  std::string message = sde_last_error();
  switch (status) {
    case SDE_ERR_INVALID_ARGUMENT:
    case SDE_ERR_FORMAT: throw py::value_error(message);
    case SDE_ERR_IO: throw std::ios_base::failure(message);  // pybind11 -> OSError
    case SDE_ERR_OUT_OF_MEMORY: {  // sdengine.OutOfMemoryError, a MemoryError and torch.OutOfMemoryError
      py::object oom = py::module_::import("sdengine.errors").attr("OutOfMemoryError");
      PyErr_SetString(oom.ptr(), message.c_str());
      throw py::error_already_set();
    }
    case SDE_ERR_CANCELLED: {
      py::object cancelled = py::module_::import("sdengine._C").attr("Cancelled");
      PyErr_SetString(cancelled.ptr(), message.c_str());
      throw py::error_already_set();
    }
    default: throw std::runtime_error(message);
  }
}

// The runtime's own errors as Python's: OSError (I/O), ValueError (the rest).
template <typename Body>
auto translated(Body &&body) -> decltype(body()) {
  try {
    return body();
  } catch (const sde::IoError &e) {
    throw std::ios_base::failure(e.what());
  } catch (const sde::Error &e) {
    throw py::value_error(e.what());
  }
}

// A JSON value as Python's json module gives it (integers of any size exactly).
py::object to_python(const sde::Json &v) {
  switch (v.type()) {
    case sde::Json::Type::Null: return py::none();
    case sde::Json::Type::Bool: return py::bool_(v.boolean());
    case sde::Json::Type::Number:
      if (v.is_integer()) return py::int_(v.integer());
      if (!v.big_integer_text().empty())
        return py::reinterpret_steal<py::object>(PyLong_FromString(v.big_integer_text().c_str(), nullptr, 10));
      return py::float_(v.number());
    case sde::Json::Type::String: return py::str(v.str());
    case sde::Json::Type::Array: {
      py::list out;
      for (const auto &item : v.array()) out.append(to_python(item));
      return std::move(out);
    }
    case sde::Json::Type::Object: {
      py::dict out;
      for (const auto &[key, item] : v.members()) out[py::str(key)] = to_python(item);
      return std::move(out);
    }
  }
  return py::none();
}

py::tuple tensor_entry(const std::string &dtype, const at::Tensor &t) {
  at::Tensor c = t.contiguous();
  return py::make_tuple(dtype, py::tuple(py::cast(c.sizes().vec())),
                        py::bytes(static_cast<const char *>(c.data_ptr()), c.nbytes()));
}

class PyTokenizer {
 public:
  explicit PyTokenizer(const std::string &folder) { check(sde_tokenizer_load(folder.c_str(), &tok_)); }
  ~PyTokenizer() { sde_tokenizer_free(tok_); }
  std::vector<int32_t> tokens(const std::string &text) const {
    int count = 0;
    check(sde_tokenizer_encode(tok_, text.c_str(), nullptr, 0, &count));
    std::vector<int32_t> ids(static_cast<size_t>(count));
    check(sde_tokenizer_encode(tok_, text.c_str(), ids.data(), count, &count));
    return ids;
  }

 private:
  sde_tokenizer *tok_ = nullptr;
};

struct ProgressState {
  std::function<bool(int, int)> fn;
  std::function<bool(int, int, py::array_t<float>)> latents_fn;
  bool error = false;
  py::object exc_value;
};

// The callbacks' exceptions are kept and raised again once the request has stopped.
template <typename Call>
int call_python(ProgressState *state, Call &&call) {
  py::gil_scoped_acquire gil;
  try {
    return call() ? 0 : 1;  // False from the callback cancels
  } catch (py::error_already_set &e) {
    state->error = true;
    state->exc_value = e.value();
    return 1;
  }
}

int progress_trampoline(void *user, int step, int steps) {
  auto *state = static_cast<ProgressState *>(user);
  return call_python(state, [&] { return state->fn(step, steps); });
}

int latents_trampoline(void *user, int step, int steps, const float *latents, const int64_t shape[4]) {
  auto *state = static_cast<ProgressState *>(user);
  return call_python(state, [&] {
    py::array_t<float> array(std::vector<py::ssize_t>(shape, shape + 4), latents);  // a copy
    return state->latents_fn(step, steps, array);
  });
}

py::dict graph_stats(const sde_graph_stats &g) {
  py::dict d;
  d["captures"] = g.captures;
  d["replays"] = g.replays;
  d["direct"] = g.direct;
  d["failed"] = g.failed;
  d["evicted"] = g.evicted;
  d["cached"] = g.cached;
  return d;
}

class PyControlNet {
 public:
  PyControlNet(const std::string &path, const sde_model *model, std::optional<std::string> engine_dir) {
    sde_controlnet_params params;
    sde_controlnet_params_init(&params);
    params.model = model;
    params.engine_dir = engine_dir ? engine_dir->c_str() : nullptr;
    py::gil_scoped_release release;
    check(sde_controlnet_load(path.c_str(), &params, &controlnet_));
  }
  ~PyControlNet() { sde_controlnet_free(controlnet_); }
  const sde_controlnet *get() const { return controlnet_; }

 private:
  sde_controlnet *controlnet_ = nullptr;
};

class PyDeepCache {
 public:
  PyDeepCache(const sde_model *model, int branch, std::optional<std::string> engine_dir) {
    sde_deepcache_params params;
    sde_deepcache_params_init(&params);
    params.model = model;
    params.branch = branch;
    params.engine_dir = engine_dir ? engine_dir->c_str() : nullptr;
    py::gil_scoped_release release;
    check(sde_deepcache_load(&params, &deepcache_));
  }
  ~PyDeepCache() { sde_deepcache_free(deepcache_); }
  const sde_deepcache *get() const { return deepcache_; }

 private:
  sde_deepcache *deepcache_ = nullptr;
};

class PyModel {
 public:
  // tensors: (name, data_ptr, dtype code, shape, device_type, device_index); the caller keeps them alive.
  PyModel(const std::vector<std::tuple<std::string, uintptr_t, int, std::vector<int64_t>, int, int>> &tensors,
          std::optional<std::string> model_dir, std::optional<std::string> config_json,
          std::optional<std::string> engine_dir, std::optional<std::string> tokenizer_dir, int max_concurrency,
          std::optional<std::string> tokenizer_2_dir, int max_graphs) {
    sde_model_params params;
    sde_model_params_init(&params);
    params.max_graphs = max_graphs;
    params.engine_dir = engine_dir ? engine_dir->c_str() : nullptr;
    params.tokenizer_dir = tokenizer_dir ? tokenizer_dir->c_str() : nullptr;
    params.tokenizer_2_dir = tokenizer_2_dir ? tokenizer_2_dir->c_str() : nullptr;
    params.max_concurrency = max_concurrency;
    std::vector<sde_tensor_view> views;
    for (const auto &[name, ptr, dtype, shape, device_type, device_index] : tensors) {
      sde_tensor_view v{};
      v.name = name.c_str();
      v.data = reinterpret_cast<void *>(ptr);
      v.dtype = static_cast<sde_dtype>(dtype);
      v.ndim = static_cast<int>(shape.size());
      v.shape = shape.data();
      v.device_type = static_cast<sde_device_type>(device_type);
      v.device_index = device_index;
      views.push_back(v);
    }
    py::gil_scoped_release release;
    check(sde_model_load_tensors(views.data(), static_cast<int>(views.size()), model_dir ? model_dir->c_str() : nullptr,
                                 config_json ? config_json->c_str() : nullptr, &params, &model_));
  }

  // From a diffusers folder or a single .safetensors file, read in C++.
  PyModel(const std::string &path, std::optional<std::string> engine_dir, int max_concurrency,
          std::optional<std::string> tokenizer_dir, std::optional<std::string> prediction_type,
          std::optional<std::string> tokenizer_2_dir, int max_graphs) {
    sde_model_params params;
    sde_model_params_init(&params);
    params.max_graphs = max_graphs;
    params.engine_dir = engine_dir ? engine_dir->c_str() : nullptr;
    params.tokenizer_dir = tokenizer_dir ? tokenizer_dir->c_str() : nullptr;
    params.tokenizer_2_dir = tokenizer_2_dir ? tokenizer_2_dir->c_str() : nullptr;
    params.prediction_type = prediction_type ? prediction_type->c_str() : nullptr;
    params.max_concurrency = max_concurrency;
    py::gil_scoped_release release;
    check(sde_model_load(path.c_str(), &params, &model_));
  }

  ~PyModel() { sde_model_free(model_); }

  int default_size() const { return sde_model_default_size(model_); }

  py::dict stats() const {
    sde_model_stats st;
    check(sde_model_get_stats(model_, &st));
    py::dict d;
    d["cuda_graphs"] = st.cuda_graphs != 0;
    d["instances"] = st.instances;
    d["text"] = graph_stats(st.text);
    d["step"] = graph_stats(st.step);
    d["decode"] = graph_stats(st.decode);
    return d;
  }

  // Returns [(rgb bytes, width, height, seed)].
  py::list generate(const std::string &prompt, std::optional<std::string> negative_prompt, int width, int height,
                    int steps, double guidance_scale, py::int_ seed, int batch_size, std::optional<std::string> sampler,
                    std::optional<std::string> schedule, std::optional<double> eta,
                    std::optional<std::function<bool(int, int)>> progress,
                    std::optional<py::bytes> init_image, std::optional<double> strength,
                    std::optional<py::bytes> mask_image,
                    std::optional<std::function<bool(int, int, py::array_t<float>)>> latents,
                    std::optional<std::string> conventions, std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>> latents_in,
                    py::int_ subseed, double subseed_strength, int seed_resize_from_w, int seed_resize_from_h,
                    int64_t eta_noise_seed_delta, const std::string &rng, const std::string &prompt_syntax,
                    const std::vector<std::tuple<PyControlNet *, py::bytes, double, double, double, bool>> &controls,
                    int clip_skip, int prompt_windows, int deepcache_interval, PyDeepCache *deepcache) {
    sde_gen_params p;
    sde_gen_params_init(&p);
    std::string init_bytes, mask_bytes;
    size_t pixels = static_cast<size_t>(width) * height;
    if (init_image) {
      init_bytes = *init_image;
      if (init_bytes.size() != pixels * 3)
        throw py::value_error("init_image must hold width * height * 3 RGB bytes (" + std::to_string(width) + "x" +
                              std::to_string(height) + "), got " + std::to_string(init_bytes.size()));
      p.init_image = reinterpret_cast<const uint8_t *>(init_bytes.data());
    }
    if (mask_image) {
      mask_bytes = *mask_image;
      if (mask_bytes.size() != pixels)
        throw py::value_error("mask_image must hold width * height bytes (" + std::to_string(width) + "x" +
                              std::to_string(height) + "), got " + std::to_string(mask_bytes.size()));
      p.mask_image = reinterpret_cast<const uint8_t *>(mask_bytes.data());
    }
    p.strength = strength ? *strength : SDE_STRENGTH_DEFAULT;
    p.prompt = prompt.c_str();
    p.negative_prompt = negative_prompt ? negative_prompt->c_str() : nullptr;
    p.width = width;
    p.height = height;
    p.steps = steps;
    p.guidance_scale = guidance_scale;
    // A Python int of any size: refused with sdengine.request's words, not pybind11's.
    if (PyObject_RichCompareBool(seed.ptr(), py::int_(0).ptr(), Py_LT) == 1 ||
        PyObject_RichCompareBool(seed.ptr(), py::int_(UINT64_MAX).ptr(), Py_GT) == 1)
      throw py::value_error("seed must be an integer in [0, 2**64 - 1] (image i gets seed + i), got " +
                            std::string(py::str(seed)));
    p.seed = seed.cast<uint64_t>();
    p.batch_size = batch_size;
    // None: the rules' default (SDE_ETA_DEFAULT, whose value -1 is the C API's sentinel, not an eta a caller gives).
    if (eta && !(std::isfinite(*eta) && *eta >= 0))
      throw py::value_error("eta must be a finite number >= 0 (None: the rules' default), got " + std::to_string(*eta));
    p.eta = eta ? *eta : SDE_ETA_DEFAULT;
    // With conventions given, sampler and schedule are canonical names (a Plan's); else names
    // read as the Python API reads them (sde_sampler_parse: A1111's spellings, A1111's rules).
    if (conventions) {
      if (*conventions != "a1111" && *conventions != "diffusers")
        throw py::value_error("conventions must be 'a1111' or 'diffusers', got '" + *conventions + "'");
      p.conventions = *conventions == "a1111" ? SDE_CONVENTIONS_A1111 : SDE_CONVENTIONS_DIFFUSERS;
      translated([&] {
        if (sampler) p.sampler = sde::sampler_of_name(*sampler);
        if (schedule) p.schedule = sde::schedule_of_name(*schedule);
        return 0;
      });
    } else {
      if (sampler) check(sde_sampler_parse(sampler->c_str(), &p.sampler, &p.schedule, &p.conventions));
      if (schedule) check(sde_schedule_parse(schedule->c_str(), p.conventions, &p.schedule));
    }
    if (latents_in) {
      if (latents_in->ndim() != 4 || latents_in->shape(0) != batch_size)
        throw py::value_error("latents_in must be a (batch_size, C, h, w) float array");
      p.latents_in = latents_in->data();
    }
    p.subseed = subseed.cast<uint64_t>();
    p.subseed_strength = subseed_strength;
    p.seed_resize_from_w = seed_resize_from_w, p.seed_resize_from_h = seed_resize_from_h;
    p.eta_noise_seed_delta = eta_noise_seed_delta;
    if (rng != "cpu" && rng != "nv")
      throw py::value_error("rng must be 'cpu' or 'nv' in the C runtime (A1111's 'gpu' source is CUDA's generator, whose "
                            "numbers 'nv' draws on any device), got '" + rng + "'");
    p.rng = rng == "nv" ? SDE_RNG_NV : SDE_RNG_CPU;
    if (prompt_syntax != "plain" && prompt_syntax != "a1111")
      throw py::value_error("prompt_syntax must be 'plain' or 'a1111', got '" + prompt_syntax + "'");
    p.prompt_syntax = prompt_syntax == "a1111" ? SDE_PROMPT_SYNTAX_A1111 : SDE_PROMPT_SYNTAX_PLAIN;
    p.clip_skip = clip_skip;  // checked by sde_model_generate
    p.prompt_windows = prompt_windows;
    p.deepcache_interval = deepcache_interval;  // checked by sde_model_generate
    p.deepcache = deepcache ? deepcache->get() : nullptr;
    // ControlNets: (controlnet, RGB bytes at the request's size, scale, start, end, guess mode)
    std::vector<std::string> control_bytes;
    std::vector<sde_control> control_list;
    control_bytes.reserve(controls.size());
    for (const auto &[controlnet, image, scale, start, end, guess] : controls) {
      control_bytes.push_back(image);
      if (control_bytes.back().size() != pixels * 3)
        throw py::value_error("a control image must hold width * height * 3 RGB bytes");
      sde_control c;
      sde_control_init(&c);
      c.controlnet = controlnet->get();
      c.image = reinterpret_cast<const uint8_t *>(control_bytes.back().data());
      c.scale = scale, c.start = start, c.end = end, c.guess_mode = guess ? 1 : 0;
      control_list.push_back(c);
    }
    p.controls = control_list.empty() ? nullptr : control_list.data();
    p.control_count = static_cast<int>(control_list.size());
    ProgressState state;
    if (progress) {
      state.fn = *progress;
      p.progress = progress_trampoline;
      p.progress_user = &state;
    }
    if (latents) {
      state.latents_fn = *latents;
      p.latents = latents_trampoline;
      p.latents_user = &state;
    }
    sde_image *images = nullptr;
    int count = 0;
    sde_status status;
    {
      py::gil_scoped_release release;
      status = sde_model_generate(model_, &p, &images, &count);
    }
    if (state.error) {
      PyErr_SetObject(py::type::handle_of(state.exc_value).ptr(), state.exc_value.ptr());
      throw py::error_already_set();
    }
    check(status);
    py::list out;
    for (int i = 0; i < count; ++i) {
      const sde_image &im = images[i];
      out.append(py::make_tuple(py::bytes(reinterpret_cast<const char *>(im.data),
                                          static_cast<size_t>(im.width) * im.height * im.channels),
                                im.width, im.height, im.seed));
    }
    sde_images_free(images, count);
    return out;
  }

  void set_loras(const std::vector<std::pair<std::string, float>> &loras) {
    std::vector<sde_lora> set;
    for (const auto &[path, scale] : loras) set.push_back({path.c_str(), scale});
    sde_status status;
    {
      py::gil_scoped_release release;
      status = sde_model_set_loras(model_, set.data(), static_cast<int>(set.size()));
    }
    check(status);
  }

  void load_embedding(const std::string &path, std::optional<std::string> token) {
    check(sde_model_load_embedding(model_, path.c_str(), token ? token->c_str() : nullptr));
  }

  void add_token(const std::string &token, const std::vector<int32_t> &ids, const std::vector<int32_t> &ids_2) {
    check(sde_model_add_token(model_, token.c_str(), ids.data(), static_cast<int>(ids.size()),
                              ids_2.empty() ? nullptr : ids_2.data(), static_cast<int>(ids_2.size())));
  }

  sde_model *get() const { return model_; }

 private:
  sde_model *model_ = nullptr;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdengine native runtime (libsdengine)";
  py::register_exception<std::ios_base::failure>(m, "IOError", PyExc_OSError);
  static py::exception<std::runtime_error> cancelled(m, "Cancelled", PyExc_RuntimeError);
  m.def("version", &sde_version, "libsdengine version");
  m.def("status_str", [](int status) { return sde_status_str(static_cast<sde_status>(status)); });

  m.def("name_table", &sde::name_table, "The compiled-in copy of NAMES['samplers'] or NAMES['schedules']");
  m.def("parse_sampler", [](const std::string &name) {
    sde_sampler s;
    sde_schedule sched = SDE_SCHEDULE_COUNT;
    check(sde_sampler_from_str(name.c_str(), &s, &sched));
    py::object schedule = py::none();
    if (sched != SDE_SCHEDULE_COUNT) schedule = py::str(sde_schedule_name(sched));
    return py::make_tuple(sde_sampler_name(s), schedule);
  });
  m.def("parse_sampler_conventions", [](const std::string &name) {
    sde_sampler s;
    sde_schedule sched = SDE_SCHEDULE_COUNT;
    sde_conventions conventions;
    check(sde_sampler_parse(name.c_str(), &s, &sched, &conventions));
    py::object schedule = py::none();
    if (sched != SDE_SCHEDULE_COUNT) schedule = py::str(sde_schedule_name(sched));
    return py::make_tuple(sde_sampler_name(s), schedule, conventions == SDE_CONVENTIONS_A1111 ? "a1111" : "diffusers");
  }, "sde_sampler_parse: (sampler, schedule or None, conventions)");
  m.def("sampler_name", [](int i) { return sde_sampler_name(static_cast<sde_sampler>(i)); });
  m.def("schedule_name", [](int i) { return sde_schedule_name(static_cast<sde_schedule>(i)); });
  m.def("parse_schedule", [](const std::string &name) {
    sde_schedule s;
    check(sde_schedule_from_str(name.c_str(), &s));
    return std::string(sde_schedule_name(s));
  });
  m.def("plan", [](const std::string &sampler, const std::string &schedule, int steps, const std::string &config_json,
                   double strength, const std::string &conventions, double eta, bool is_sdxl) {
    try {
      sde::SchedulerConfig cfg = sde::SchedulerConfig::from_json(sde::Json::parse(config_json, "config"), "config");
      sde::Plan plan;
      if (conventions == "a1111") {
        plan = sde::make_a1111_plan(sde::sampler_of_name(sampler), sde::schedule_of_name(schedule), steps, cfg, strength,
                                    eta, is_sdxl);
      } else {
        sde_sampler s;
        sde::parse_sampler(sampler, &s, nullptr);
        plan = sde::make_plan(s, sde::parse_schedule(schedule), steps, cfg, strength);
      }
      sde::Program program = sde::make_program(plan, cfg.prediction_type, eta > 0 ? eta : 0.0);
      py::dict out;
      out["start"] = plan.start;
      out["timesteps"] = plan.timesteps;
      out["sigmas"] = plan.sigmas;
      out["prev_timesteps"] = plan.prev_timesteps;
      out["init_noise_sigma"] = plan.init_noise_sigma;
      out["lower_order_final"] = plan.lower_order_final;
      out["num_steps"] = plan.num_steps();
      out["schedule"] = sde_schedule_name(plan.schedule);
      out["evaluations"] = program.evals.size();
      out["program_steps"] = program.steps;
      return out;
    } catch (const sde::Error &e) {
      throw py::value_error(e.what());
    }
  }, py::arg("sampler"), py::arg("schedule"), py::arg("steps"), py::arg("config_json"), py::arg("strength") = 1.0,
     py::arg("conventions") = "diffusers", py::arg("eta") = -1.0, py::arg("is_sdxl") = false,
     "The C++ sampling plan and its program's size (for comparison with sdengine.samplers.plan_for)");
  m.def("brownian_noise", [](std::vector<uint64_t> seeds, std::vector<int64_t> shape, double sigma_min,
                              double sigma_max, std::vector<std::pair<double, double>> queries) {
    sde::BrownianNoise noise(seeds, shape, sigma_min, sigma_max);
    std::vector<py::bytes> out;
    for (const auto &[a, b] : queries) {
      at::Tensor t = noise(a, b).contiguous();
      out.emplace_back(static_cast<const char *>(t.data_ptr()), t.nbytes());
    }
    return out;
  }, "A1111's Brownian-tree noise (N, *shape) float32 bytes per (sigma, sigma_next) query");
  m.def("philox_randn", [](uint64_t seed, std::vector<int64_t> shape, int draws) {
    sde::SeedOptions o;
    o.seeds = {seed};
    o.philox = true;
    sde::ImageNoise noise(o, shape);
    std::vector<py::bytes> out;
    for (int i = 0; i < draws; ++i) {
      at::Tensor t = noise.next().contiguous();
      out.emplace_back(static_cast<const char *>(t.data_ptr()), t.nbytes());
    }
    return out;
  }, py::arg("seed"), py::arg("shape"), py::arg("draws") = 1, "A1111's NV (Philox) draws of one seed, as float32 bytes");

  m.def("read_safetensors", [](const std::string &path) {
    std::unique_ptr<sde::SafetensorsFile> file = translated([&] {
      py::gil_scoped_release release;
      return std::make_unique<sde::SafetensorsFile>(path);
    });
    py::dict tensors;
    for (const auto &name : file->names()) tensors[py::str(name)] = tensor_entry(file->dtype_name(name), file->tensor(name));
    py::object metadata = py::none();
    if (file->has_metadata()) metadata = py::cast(file->metadata_map());
    return py::make_tuple(tensors, metadata);
  }, py::arg("path"),
     "The runtime's safetensors reader: ({name: (dtype, shape, raw bytes)}, metadata or None); "
     "ValueError for a file it refuses (for comparison with the safetensors library)");
  m.def("read_engine_json", [](const std::string &path) {
    sde::Json engine = translated([&] {
      sde::Json j = sde::Json::read_file(path);
      sde::check_engine_json(j, path);
      return j;
    });
    return to_python(engine);
  }, py::arg("path"), "The runtime's engine.json reader: the checked document, or ValueError naming the key");
  m.def("single_file_weights", [](const std::string &path, const std::string &engine_json) {
    py::dict out;
    translated([&] {
      sde::Json engine = sde::Json::read_file(engine_json);
      sde::check_engine_json(engine, engine_json);
      sde::SafetensorsFile file(path);
      for (const auto &[name, t] : sde::single_file_weights(file, engine))
        out[py::str(name)] = tensor_entry(sde::safetensors_dtype_name(t.scalar_type()), t);
      return 0;
    });
    return out;
  }, py::arg("path"), py::arg("engine_json"),
     "The runtime's single-file key map: {'<component>/<key>': (dtype, shape, bytes)} for the "
     "engine's constants, or ValueError");

  py::class_<PyTokenizer>(m, "Tokenizer")
      .def(py::init<const std::string &>(), py::arg("folder"))
      .def("tokens", &PyTokenizer::tokens, py::arg("text"), "BPE ids without BOS / EOS / padding");

  py::class_<PyModel>(m, "Model")
      .def(py::init<const std::vector<std::tuple<std::string, uintptr_t, int, std::vector<int64_t>, int, int>> &,
                    std::optional<std::string>, std::optional<std::string>, std::optional<std::string>,
                    std::optional<std::string>, int, std::optional<std::string>, int>(),
           py::arg("tensors"), py::arg("model_dir"), py::arg("config_json"), py::arg("engine_dir"),
           py::arg("tokenizer_dir"), py::arg("max_concurrency") = 0, py::arg("tokenizer_2_dir") = py::none(),
           py::arg("max_graphs") = 0)
      .def(py::init<const std::string &, std::optional<std::string>, int, std::optional<std::string>,
                    std::optional<std::string>, std::optional<std::string>, int>(),
           py::arg("path"), py::arg("engine_dir") = py::none(), py::arg("max_concurrency") = 0,
           py::arg("tokenizer_dir") = py::none(), py::arg("prediction_type") = py::none(),
           py::arg("tokenizer_2_dir") = py::none(), py::arg("max_graphs") = 0)
      .def_property_readonly("default_size", &PyModel::default_size)
      .def("stats", &PyModel::stats, "sde_model_get_stats: what each kind of graph has done")
      .def("generate", &PyModel::generate, py::arg("prompt"), py::arg("negative_prompt") = py::none(),
           py::arg("width") = 0, py::arg("height") = 0, py::arg("steps") = 0, py::arg("guidance_scale") = 7.5,
           py::arg("seed") = 0, py::arg("batch_size") = 1, py::arg("sampler") = py::none(),
           py::arg("schedule") = py::none(), py::arg("eta") = py::none(), py::arg("progress") = py::none(),
           py::arg("init_image") = py::none(), py::arg("strength") = py::none(), py::arg("mask_image") = py::none(),
           py::arg("latents") = py::none(), py::arg("conventions") = py::none(), py::arg("latents_in") = py::none(),
           py::arg("subseed") = 0, py::arg("subseed_strength") = 0.0, py::arg("seed_resize_from_w") = 0,
           py::arg("seed_resize_from_h") = 0, py::arg("eta_noise_seed_delta") = 0, py::arg("rng") = "cpu",
           py::arg("prompt_syntax") = "plain",
           py::arg("controls") = std::vector<std::tuple<PyControlNet *, py::bytes, double, double, double, bool>>(),
           py::arg("clip_skip") = 0, py::arg("prompt_windows") = 0, py::arg("deepcache_interval") = 0,
           py::arg("deepcache") = py::none())
      .def("set_loras", &PyModel::set_loras, py::arg("loras"),
           "sde_model_set_loras: [(path, scale), ...] merged in place of the set merged now; [] restores")
      .def("load_embedding", &PyModel::load_embedding, py::arg("path"), py::arg("token") = py::none(),
           "sde_model_load_embedding")
      .def("add_token", &PyModel::add_token, py::arg("token"), py::arg("ids"), py::arg("ids_2") = std::vector<int32_t>(),
           "sde_model_add_token: a token whose vectors are already in the added-token tables")
      .def("controlnet", [](const PyModel &self, const std::string &path, std::optional<std::string> engine_dir) {
             return std::make_unique<PyControlNet>(path, self.get(), engine_dir);
           }, py::arg("path"), py::arg("engine_dir") = py::none(), py::keep_alive<0, 1>(),
           "sde_controlnet_load for this model")
      .def("deepcache", [](const PyModel &self, int branch, std::optional<std::string> engine_dir) {
             return std::make_unique<PyDeepCache>(self.get(), branch, engine_dir);
           }, py::arg("branch"), py::arg("engine_dir") = py::none(), py::keep_alive<0, 1>(),
           "sde_deepcache_load for this model");
  py::class_<PyControlNet>(m, "ControlNet");
  py::class_<PyDeepCache>(m, "DeepCache");
  m.def("infotext_params", [](const std::string &text) {
    sde_gen_params p;
    sde_gen_params_init(&p);
    sde_infotext *info = nullptr;
    check(sde_gen_params_from_infotext(text.c_str(), &p, &info));
    py::dict out;
    out["prompt"] = p.prompt;
    out["negative_prompt"] = p.negative_prompt ? py::object(py::str(p.negative_prompt)) : py::none();
    out["steps"] = p.steps, out["guidance_scale"] = p.guidance_scale, out["seed"] = p.seed;
    out["width"] = p.width, out["height"] = p.height;
    out["sampler"] = sde_sampler_name(p.sampler), out["schedule"] = sde_schedule_name(p.schedule);
    out["conventions"] = p.conventions == SDE_CONVENTIONS_A1111 ? "a1111" : "diffusers";
    out["eta"] = p.eta, out["strength"] = p.strength;
    out["subseed"] = p.subseed, out["subseed_strength"] = p.subseed_strength;
    out["seed_resize_from"] = py::make_tuple(p.seed_resize_from_w, p.seed_resize_from_h);
    out["eta_noise_seed_delta"] = p.eta_noise_seed_delta, out["rng"] = p.rng == SDE_RNG_NV ? "nv" : "cpu";
    out["prompt_syntax"] = p.prompt_syntax == SDE_PROMPT_SYNTAX_A1111 ? "a1111" : "plain";
    out["clip_skip"] = p.clip_skip;
    out["deepcache_interval"] = p.deepcache_interval, out["deepcache_branch"] = p.deepcache_branch;
    const char *model = sde_infotext_field(info, "Model");
    out["model"] = model ? py::object(py::str(model)) : py::none();
    sde_infotext_free(info);
    return out;
  }, py::arg("text"), "sde_gen_params_from_infotext, as a dict (for comparison with sdengine.infotext)");
}
