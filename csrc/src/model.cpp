#include "model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <shared_mutex>

#include "controlnet.h"
#include "deepcache.h"
#include "errors.h"
#include "names.h"
#include "prompt_syntax.h"

namespace sde {
namespace {

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
// The instance pool
// ---------------------------------------------------------------------------

InstancePool::InstancePool(int size) : busy_(static_cast<size_t>(std::max(size, 1)), false) {}

int InstancePool::acquire() {
  std::unique_lock<std::mutex> lock(mutex_);
  int found = -1;
  freed_.wait(lock, [&] {
    for (size_t i = 0; i < busy_.size(); ++i)
      if (!busy_[i]) return found = static_cast<int>(i), true;
    return false;
  });
  busy_[static_cast<size_t>(found)] = true;
  return found;
}

void InstancePool::release(int instance) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    busy_.at(static_cast<size_t>(instance)) = false;
  }
  freed_.notify_one();
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

Model::Model(ModelSource source, const sde_model_params &params) : dtype_(at::kFloat) {
  // -- configs ----------------------------------------------------------------
  const Json &vae_cfg = source.vae, &unet_cfg = source.unet, &sched_cfg = source.scheduler;
  info_.scheduler = SchedulerConfig::from_json(sched_cfg, source.where, source.scheduler_file);
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
  dtype_ = engine_dtype(engine_, engine_dir_ + "/engine.json");
  std::string device = engine_.get_string("device", "cpu");
  device_ = device == "cuda" ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(params.device_index, 0)))
                             : at::Device(at::kCPU);
  info_.latent_multiple = static_cast<int>(engine_.get_number("latent_multiple", 1));
  info_.max_prompt_windows = static_cast<int>(engine_.get_number("max_prompt_windows", 1));

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

  // The text encoders' hidden sizes (and SDXL's pooled size): the shapes of the text graphs' outputs.
  auto dim = [&](const std::string &component, const std::string &key, int axis) -> int64_t {
    const at::Tensor *w = find_weight(weights, component, key);
    return w && w->dim() == 2 ? w->size(axis) : 0;
  };
  info_.text_dim = dim("text_encoder", "text_model.embeddings.token_embedding.weight", 1);
  if (info_.sdxl) {
    info_.text_dim_2 = dim("text_encoder_2", "text_model.embeddings.token_embedding.weight", 1);
    info_.pooled_dim = dim("text_encoder_2", "text_projection.weight", 0);
  }
  // clip_skip's bound, as sdengine/request.py's: the smallest over the text encoders of their layers
  // - 1, - 2 for one already on its penultimate layer (SDXL's). The compiled graphs' depths are
  // engine.json's "config".
  const Json &config = engine_.at("config");
  std::vector<int> bounds;
  for (const char *name : {"text_encoder", "text_encoder_2"}) {
    const Json *encoder = config.find(name);
    if (!encoder || !encoder->is_object()) continue;
    int layers = static_cast<int>(encoder->get_number("num_hidden_layers", 0));
    bool penultimate = encoder->get_string("output_layer", "last") == "penultimate";
    if (bounds.empty()) info_.text_layers = layers;
    bounds.push_back(layers - 1 - (penultimate ? 1 : 0));
  }
  info_.max_clip_skip = bounds.empty() ? 0 : std::max(*std::min_element(bounds.begin(), bounds.end()), 0);

  // -- instances and networks ------------------------------------------------------
  int instances = params.max_concurrency > 0 ? params.max_concurrency : 4;
  int max_graphs = params.max_graphs == 0 ? 8 : params.max_graphs;
  bool use_graphs = max_graphs > 0;
  pool_ = std::make_unique<InstancePool>(instances);
  for (int i = 0; i < instances; ++i) {
    auto inst = std::make_unique<Instance>();
    inst->index = i;
    inst->capturer = make_capturer(device_);
    inst->text = std::make_unique<GraphCache>(*inst->capturer, counters_[kTextGraphs], max_graphs, use_graphs);
    inst->step = std::make_unique<GraphCache>(*inst->capturer, counters_[kStepGraphs], max_graphs, use_graphs);
    inst->decode = std::make_unique<GraphCache>(*inst->capturer, counters_[kDecodeGraphs], max_graphs, use_graphs);
    instances_.push_back(std::move(inst));
  }
  // A CUDA graph can capture a network only on an instance of its own (no lock, no event):
  // then every instance is its own single-threaded package.
  bool per_instance = use_graphs && instances_.front()->capturer->is_cuda();
  per_instance_ = per_instance;
  device_index_ = params.device_index;
  c10::InferenceMode guard;
  auto network = [&](const char *name) {
    return std::make_unique<Network>(engine_dir_, name, nets.at(name), instances, params.device_index, per_instance);
  };
  text_encoder_ = network("text_encoder");
  if (info_.sdxl) text_encoder_2_ = network("text_encoder_2");
  unet_ = network("unet");
  vae_decoder_ = network("vae_decoder");
  vae_encoder_ = network("vae_encoder");
  for (Network *net : {text_encoder_.get(), text_encoder_2_.get(), unet_.get(), vae_decoder_.get(), vae_encoder_.get()})
    if (net) net->load_weights(weights, buffers, dtype_, device_);
  weights_ = weights;  // for ControlNets' unet_control: the same tensors
}

Model::~Model() = default;

void Model::stats(sde_model_stats *out) const {
  *out = sde_model_stats{};
  out->cuda_graphs = instances_.front()->capturer->is_cuda() ? 1 : 0;
  out->instances = static_cast<int>(instances_.size());
  sde_graph_stats *kinds[kGraphKinds] = {&out->text, &out->step, &out->decode};
  for (int k = 0; k < kGraphKinds; ++k) {
    const GraphCounters &c = counters_[k];
    *kinds[k] = sde_graph_stats{c.captures.load(), c.replays.load(), c.direct.load(), c.failed.load(),
                                c.evictions.load(), c.cached.load()};
  }
}

// ---------------------------------------------------------------------------
// The graphed calls: each reads and writes only its own buffers (graphs.h)
// ---------------------------------------------------------------------------

namespace {

// A text encoder on a batch of token ids.
struct TextCall : Graphed {
  at::Tensor ids;     // (B, 77) int64
  at::Tensor skip;    // (B,) int64: clip_skip, an input of the compiled graph (one graph for every value)
  at::Tensor hidden;  // (B, 77, D) float32
  at::Tensor pooled;  // (B, P) float32, SDXL's second encoder only
};

// One denoising step: UNet on the doubled batch, guidance, sampler update (sampling.h).
struct StepCall : Graphed {
  std::string key;                      // its key in the step cache
  at::Tensor registers;                 // (kRegisters, N, C, h, w) float32: the sampler's state (sampling.h)
  at::Tensor noise;                     // (N, C, h, w) float32: the evaluation's fresh noise
  at::Tensor scalars;                   // (kEvalColumns,) float32: the evaluation's row of the table
  at::Tensor context, pooled, time_ids;  // (2N, 77 * windows, D), SDXL (2N, P), (2N, 6); the engine's dtype
  at::Tensor extra;                     // inpainting: (2N, 1 + C, h, w) mask and masked-image latents
  // The ControlNets this graph runs (one step graph per set of active ControlNets): their control
  // images (rows of the batch they condition, the engine's dtype) and scales (0-d float32), copied
  // in per request, and whether each is in guess mode / runs on the conditional half only.
  std::vector<const ControlNet *> controlnets;
  std::vector<int> control_index;  // which of the request's controls (sde_gen_params.controls) each is
  std::vector<at::Tensor> control_images, control_scales;
  std::vector<char> guess_mode;
  // DeepCache (deepcache.h): the engine, whether this is its cached step (else its full step), and
  // the kept state, one buffer that the full step writes and the cached step reads.
  const DeepCacheEngine *deepcache = nullptr;
  bool deep_reuse = false;
  at::Tensor kept;
};

// The VAE decoder.
struct DecodeCall : Graphed {
  at::Tensor z;       // (N, C, h, w), the engine's dtype
  at::Tensor images;  // (N, 3, H, W) float32
};

template <typename Call>
Call *find_call(GraphCache &cache, const std::string &key) {
  return static_cast<Call *>(cache.find(key));
}

}  // namespace

int Model::prompt_windows(const std::vector<std::string> &prompts) const {
  size_t most = 1;
  for (const auto &p : prompts) most = std::max(most, chunk_prompt(tokenizer_, p).size());
  return static_cast<int>(most);
}

std::pair<at::Tensor, at::Tensor> Model::encode_text(const std::vector<std::string> &prompts, bool a1111, int windows,
                                                     int clip_skip, Instance &inst) const {
  std::vector<float> weights;  // A1111's syntax: each id's weight (the first tokenizer's windows)
  auto encode = [&](const Network &net, const Tokenizer &tokenizer, int64_t dim, int64_t pooled_dim) {
    std::vector<int64_t> ids;  // (B * windows, 77): each prompt's windows in turn
    bool first = weights.empty();
    PromptWindow empty = a1111 ? chunk_prompt(tokenizer, "")[0] : PromptWindow{};
    for (const auto &p : prompts) {
      if (a1111) {
        std::vector<PromptWindow> rows = chunk_prompt(tokenizer, p);
        rows.resize(static_cast<size_t>(windows), empty);  // cut, or pad with the empty prompt's windows
        for (const auto &row : rows) {
          ids.insert(ids.end(), row.ids.begin(), row.ids.end());
          if (first) weights.insert(weights.end(), row.weights.begin(), row.weights.end());
        }
      } else {
        std::vector<int64_t> row = tokenizer.encode_padded(p);
        ids.insert(ids.end(), row.begin(), row.end());
      }
    }
    int64_t batch = static_cast<int64_t>(prompts.size()) * windows, length = tokenizer.max_length();
    std::string key = net.name() + ":" + std::to_string(batch);
    auto *call = find_call<TextCall>(*inst.text, key);
    if (!call) {
      auto made = std::make_unique<TextCall>();
      auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
      made->ids = at::zeros({batch, length}, at::TensorOptions().dtype(at::kLong).device(device_));
      made->skip = at::zeros({batch}, at::TensorOptions().dtype(at::kLong).device(device_));
      made->hidden = at::empty({batch, length, dim}, f32);
      if (pooled_dim) made->pooled = at::empty({batch, pooled_dim}, f32);
      made->fn = [this, c = made.get(), &net, index = inst.index] {
        std::vector<at::Tensor> out = net.run_all({c->ids, c->skip}, index);
        c->hidden.copy_(out.at(0));
        if (c->pooled.defined()) c->pooled.copy_(out.at(1));
      };
      call = static_cast<TextCall *>(inst.text->insert(key, std::move(made)));
    }
    call->ids.copy_(at::tensor(ids, at::kLong).reshape({batch, length}));
    call->skip.fill_(clip_skip);
    inst.text->run(*call);
    return std::make_pair(call->hidden.clone(), call->pooled.defined() ? call->pooled.clone() : at::Tensor());
  };
  if (!a1111) windows = 1;
  int64_t batch = static_cast<int64_t>(prompts.size());
  // A1111's "Original" emphasis, on each encoder's output (B * windows, 77, D) on its own, then
  // each prompt's windows side by side: (B, windows * 77, D)
  auto emphasis = [&](const at::Tensor &hidden) {
    at::Tensor out = hidden;
    if (a1111) out = apply_emphasis(hidden, at::tensor(weights, at::kFloat).reshape({hidden.size(0), hidden.size(1)}));
    return out.reshape({batch, windows * hidden.size(1), hidden.size(2)});
  };
  at::Tensor context = emphasis(encode(*text_encoder_, tokenizer_, info_.text_dim, 0).first);
  if (!info_.sdxl) return {context, at::Tensor()};
  // SDXL: both encoders' hidden states side by side; the second's pooled (projected) output of
  // each prompt's first window.
  auto [context_2, pooled] = encode(*text_encoder_2_, *tokenizer_2_, info_.text_dim_2, info_.pooled_dim);
  pooled = pooled.reshape({batch, windows, pooled.size(1)}).select(1, 0);
  return {at::cat({context, emphasis(context_2)}, -1), pooled};  // (B, 77 * windows, D1 + D2), (B, P)
}

at::Tensor Model::encode_image(const at::Tensor &image, std::vector<at::Generator> &generators, Instance &inst) const {
  at::Tensor moments = vae_encoder_->run({image.to(device_, dtype_).contiguous()}, inst.index).to(at::kFloat).cpu();
  auto mean_logvar = moments.chunk(2, 1);  // (1, C, h, w) each
  at::Tensor mean = mean_logvar[0], std_dev = at::exp(mean_logvar[1] * 0.5);
  std::vector<at::Tensor> latents;
  for (auto &g : generators) latents.push_back(mean + std_dev * at::randn(mean.sizes(), g, at::kFloat));
  at::Tensor out = at::cat(latents);  // (N, C, h, w)
  if (info_.has_shift) out = out - info_.shift_factor;
  return (out * info_.scaling_factor).to(device_);
}

at::Tensor Model::decode(const at::Tensor &z, Instance &inst) const {
  int64_t n = z.size(0), h = z.size(2), w = z.size(3);
  std::string key = std::to_string(n) + ":" + std::to_string(h) + "x" + std::to_string(w);
  auto *call = find_call<DecodeCall>(*inst.decode, key);
  if (!call) {
    auto made = std::make_unique<DecodeCall>();
    made->z = at::empty(z.sizes(), at::TensorOptions().dtype(dtype_).device(device_));
    made->images = at::empty({n, 3, h * info_.downscale, w * info_.downscale},
                             at::TensorOptions().dtype(at::kFloat).device(device_));
    made->fn = [this, c = made.get(), index = inst.index] { c->images.copy_(vae_decoder_->run({c->z}, index)); };
    call = static_cast<DecodeCall *>(inst.decode->insert(key, std::move(made)));
  }
  call->z.copy_(z);
  inst.decode->run(*call);
  return call->images;  // read before this instance's next decode
}

// ---------------------------------------------------------------------------
// A request
// ---------------------------------------------------------------------------

at::Tensor Model::generate(const sde_gen_params &p, sde_sampler sampler, std::vector<uint64_t> &seeds) const {
  std::shared_lock<ReadWriteLock> reading(lock_);  // no LoRA swap while the request runs
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
  // Whose rules: the caller's, else diffusers' for the samplers of both vocabularies and A1111's
  // for those only A1111 has (sdengine.samplers.conventions_for reads the spelling; here the
  // caller's sde_sampler_parse did).
  bool a1111 = p.conventions == SDE_CONVENTIONS_A1111 ||
               (p.conventions == SDE_CONVENTIONS_DEFAULT && sampler >= SDE_SAMPLER_DPMPP_2M_SDE_HEUN);
  // Guidance: diffusers skips it at a scale of 1 or below, A1111 only at exactly 1 (pipeline.Run.do_cfg).
  bool do_cfg = a1111 ? p.guidance_scale != 1.0 : p.guidance_scale > 1.0;
  if (n * (do_cfg ? 2 : 1) > static_cast<int>(engine_.get_number("max_batch", 64)))
    throw InvalidArgument("batch_size " + std::to_string(n) + " exceeds the engine's maximum batch");

  bool inpaint = p.mask_image != nullptr;
  if (inpaint && !info.inpainting)
    throw InvalidArgument("mask_image needs an inpainting model (a " + std::to_string(2 * info.latent_channels + 1) +
                          "-channel UNet)");
  if (info.inpainting && !inpaint) throw InvalidArgument("this is an inpainting model: give init_image and mask_image");
  if (p.clip_skip < 0 || p.clip_skip > info.max_clip_skip)  // sdengine/request.py's words
    throw InvalidArgument("clip_skip must be an integer in [0, " + std::to_string(info.max_clip_skip) +
                          "] (the text encoder has " + std::to_string(info.text_layers) + " layers), got " +
                          std::to_string(p.clip_skip));
  double strength = p.strength != SDE_STRENGTH_DEFAULT ? p.strength : inpaint ? 1.0 : 0.8;
  // Inpainting at strength 1 starts from pure noise, as diffusers' (is_strength_max).
  bool init_for_sampler = p.init_image && (!inpaint || strength < 1.0);
  if (!a1111) {
    for (auto [name, set] : {std::pair<const char *, bool>{"subseed_strength", p.subseed_strength != 0},
                             {"seed_resize_from_w", p.seed_resize_from_w != 0},
                             {"eta_noise_seed_delta", p.eta_noise_seed_delta != 0}, {"rng", p.rng != SDE_RNG_CPU}})
      if (set)
        throw InvalidArgument(std::string(name) + " is one of A1111's seed options: it applies under A1111's rules "
                              "(conventions a1111), not to diffusers' " + sde_sampler_name(sampler));
  }
  double plan_strength = init_for_sampler ? strength : 1.0;
  Plan plan = a1111 ? make_a1111_plan(sampler, p.schedule, steps, info.scheduler, plan_strength, p.eta, info.sdxl)
                    : make_plan(sampler, p.schedule, steps, info.scheduler, plan_strength);
  Program program = make_program(plan, info.scheduler.prediction_type, p.eta > 0 ? p.eta : 0.0);

  // This request's instance, for its whole run: its networks, graphs and (CUDA) stream.
  HeldInstance held(*pool_);
  Instance &inst = *instances_[static_cast<size_t>(held.index())];
  std::shared_ptr<void> on_stream = inst.capturer->use_stream();

  // -- text: [uncond, cond] (A1111's syntax: <lora:> tags are the caller's to merge) ------------
  if (p.prompt_syntax == SDE_PROMPT_SYNTAX_A1111)
    for (const char *text : {p.prompt, p.negative_prompt}) {
      std::vector<LoraTag> tags;
      if (text) extract_lora_tags(text, &tags);
      if (!tags.empty())
        throw InvalidArgument("prompt_syntax a1111: <lora:" + tags[0].name + "> tags are not read by the C runtime; "
                              "merge the LoRA with sde_model_set_loras and remove the tag");
    }
  std::vector<std::string> prompts(static_cast<size_t>(n), p.prompt);
  bool a1111_syntax = p.prompt_syntax == SDE_PROMPT_SYNTAX_A1111;
  // A1111's syntax: prompt and negative prompt take the same number of 75-token windows
  // (longer prompts, BREAK), the UNet's context 77 tokens per window.
  int windows = 1;
  if (a1111_syntax) {
    std::vector<std::string> texts = {p.prompt};
    if (do_cfg && (!info.sdxl || p.negative_prompt)) texts.emplace_back(p.negative_prompt ? p.negative_prompt : "");
    windows = std::max(prompt_windows(texts), p.prompt_windows);
    if (windows > info.max_prompt_windows)
      throw InvalidArgument("prompt_syntax a1111: the prompt needs " + std::to_string(windows) +
                            " windows of 75 tokens (a longer prompt, or BREAK) but this engine's UNet takes at most " +
                            std::to_string(info.max_prompt_windows) +
                            (info.max_prompt_windows == 1 ? " (it was compiled with static shapes)" : ""));
  }
  auto [context, pooled] = encode_text(prompts, a1111_syntax, windows, p.clip_skip, inst);
  if (do_cfg) {
    at::Tensor neg_context, neg_pooled;
    if (info.sdxl && !p.negative_prompt) {  // SDXL's force_zeros_for_empty_prompt
      neg_context = at::zeros_like(context);
      neg_pooled = at::zeros_like(pooled);
    } else {
      std::vector<std::string> negatives(static_cast<size_t>(n), p.negative_prompt ? p.negative_prompt : "");
      std::tie(neg_context, neg_pooled) = encode_text(negatives, a1111_syntax, windows, p.clip_skip, inst);
    }
    context = at::cat({neg_context, context});  // (2N, 77 * windows, D)
    if (info.sdxl) pooled = at::cat({neg_pooled, pooled});
  }

  // -- initial state: one CPU generator per image, as torch.Generator().manual_seed(seed + i)
  //    (A1111's variation seeds: every image keeps the seed); img2img draws each image's
  //    posterior sample before its noise (diffusers' order) -----------------------------------
  bool variation = a1111 && p.subseed_strength != 0;
  std::vector<at::Generator> generators;
  for (int i = 0; i < n; ++i) {
    seeds.push_back(p.seed + (variation ? 0 : static_cast<uint64_t>(i)));
    generators.push_back(at::make_generator<at::CPUGeneratorImpl>(seeds.back()));
  }
  at::Tensor image;  // (1, 3, H, W) in [-1, 1], as the Python pipeline: x / 255 * 2 - 1 in float32
  if (p.init_image) {
    at::Tensor pixels = at::from_blob(const_cast<uint8_t *>(p.init_image), {1, height, width, 3}, at::kByte);
    image = (pixels.permute({0, 3, 1, 2}).to(at::kFloat) / 255) * 2 - 1;
  }
  at::Tensor init_latents = init_for_sampler ? encode_image(image, generators, inst) : at::Tensor();
  // The sampler's draws: diffusers' from the generators, A1111's from its per-image generators
  // (rng.ImageNoise: variation seed, seed resizing, ENSD, its sources).
  std::unique_ptr<ImageNoise> image_noise;
  if (a1111) {
    SeedOptions o;
    o.seeds = seeds;
    if (variation)
      for (int i = 0; i < n; ++i) o.subseeds.push_back(p.subseed + static_cast<uint64_t>(i));
    o.subseed_strength = p.subseed_strength;
    o.resize_w = p.seed_resize_from_w, o.resize_h = p.seed_resize_from_h;
    o.ensd = p.eta_noise_seed_delta;
    o.philox = p.rng == SDE_RNG_NV;
    o.downscale = info.downscale;
    image_noise = std::make_unique<ImageNoise>(o, std::vector<int64_t>{info.latent_channels, h, w});
  }
  std::unique_ptr<BrownianNoise> brownian;
  if (plan.brownian) {  // A1111's SDE samplers: over the plan's positive sigmas
    double lo = 0, hi = 0;
    for (double s : plan.sigmas)
      if (s > 0) lo = lo == 0 ? s : std::min(lo, s), hi = std::max(hi, s);
    brownian = std::make_unique<BrownianNoise>(seeds, std::vector<int64_t>{info.latent_channels, h, w}, lo, hi);
  }
  auto draw_noise = [&]() {
    if (image_noise) return image_noise->next().to(device_);
    std::vector<at::Tensor> parts;
    for (auto &g : generators) parts.push_back(at::randn({1, info.latent_channels, h, w}, g, at::kFloat));
    return at::cat(parts).to(device_);  // (N, C, h, w)
  };
  at::Tensor start_noise;
  if (p.latents_in) {
    start_noise = at::from_blob(const_cast<float *>(p.latents_in), {n, info.latent_channels, h, w}, at::kFloat).clone();
    if (!at::isfinite(start_noise).all().item<bool>()) throw InvalidArgument("latents_in must hold finite numbers");
    start_noise = start_noise.to(device_);
  } else {
    start_noise = image_noise ? image_noise->first().to(device_) : draw_noise();
  }
  at::Tensor start = initial_state(plan, start_noise, init_latents);
  // Inpainting: the UNet also reads the mask and the masked image's latents (drawn after the noise).
  at::Tensor extra_channels;
  if (inpaint) {
    at::Tensor mask_bytes = at::from_blob(const_cast<uint8_t *>(p.mask_image), {1, 1, height, width}, at::kByte);
    at::Tensor mask = (mask_bytes >= 128).to(at::kFloat);  // (1, 1, H, W): 1 = repaint
    at::Tensor masked_latents = encode_image(image * (mask < 0.5), generators, inst);  // (N, C, h, w)
    at::Tensor mask_latent = at::upsample_nearest2d(mask, {h, w}).expand({n, 1, h, w}).to(device_);
    extra_channels = at::cat({mask_latent, masked_latents}, 1);  // (N, 1 + C, h, w)
    if (do_cfg) extra_channels = at::cat({extra_channels, extra_channels});
  }

  // -- ControlNets: control images as the rows of the batch they condition ----------------
  struct Control {
    const ControlNet *controlnet;
    at::Tensor image;  // (2N, or N in guess mode with guidance, C_cond, H, W), the engine's dtype
    double scale, start, end;
    bool guess_mode;
  };
  std::vector<Control> controls;
  for (int k = 0; k < p.control_count; ++k) {
    const sde_control &c = p.controls[k];
    const ControlNet &cn = *c.controlnet->impl;
    at::Tensor pixels = at::from_blob(const_cast<uint8_t *>(c.image), {1, height, width, 3}, at::kByte);
    at::Tensor cond = pixels.permute({0, 3, 1, 2}).to(at::kFloat) / 255;  // (1, 3, H, W) in [0, 1]
    if (cn.conditioning_channels() == 1)
      cond = (cond * at::tensor({0.299f, 0.587f, 0.114f}).reshape({1, 3, 1, 1})).sum(1, true);
    bool guess = c.guess_mode != 0 || cn.global_pool();  // as diffusers
    cond = cond.expand({n, -1, -1, -1});
    if (do_cfg && !guess) cond = at::cat({cond, cond});  // [uncond, cond] rows, as the UNet batch
    controls.push_back({&cn, cond.to(device_, dtype_).contiguous(), c.scale, c.start, c.end, guess});
  }
  const int loop_steps = program.steps;  // progress calls (PLMS: steps + 1; Heun: one per pair of evaluations)
  // diffusers' controlnet_keep: step i of n runs a ControlNet unless i / n < start or (i + 1) / n > end
  auto active_at = [&](int i) {
    std::vector<bool> on;
    for (const auto &c : controls)
      on.push_back(!(static_cast<double>(i) / loop_steps < c.start || static_cast<double>(i + 1) / loop_steps > c.end));
    return on;
  };

  // -- the loop: one cached evaluation graph per (batch, guidance, latent size, active ControlNets),
  //    whatever the sampler: its numbers are rows of the program's table ---------------------
  std::string base_key = std::to_string(n) + (do_cfg ? "x2:" : ":") + std::to_string(h) + "x" + std::to_string(w) +
                         ":w" + std::to_string(windows);
  // DeepCache: the key of a step of each kind; the full and cached steps share the kept state
  const DeepCacheEngine *deepcache = p.deepcache_interval > 0 ? p.deepcache->impl.get() : nullptr;
  auto deep_key = [&](bool reuse) {
    return base_key + ":dc" + std::to_string(reinterpret_cast<uintptr_t>(deepcache)) + (reuse ? "r" : "s");
  };
  auto make_step = [&](const std::vector<bool> &active, int kind) -> StepCall * {
    // kind: -1 without DeepCache, else 1 for its cached step and 0 for its full step
    std::string key = kind < 0 ? base_key : deep_key(kind == 1);
    for (size_t k = 0; k < controls.size(); ++k)
      if (active[k])
        key += ":cn" + std::to_string(k) + "@" + std::to_string(reinterpret_cast<uintptr_t>(controls[k].controlnet)) +
               (controls[k].guess_mode ? "g" : "") + "x" + std::to_string(controls[k].image.size(0));
    auto *step = find_call<StepCall>(*inst.step, key);
    if (step) return step;
    auto made = std::make_unique<StepCall>();
    made->key = key;
    auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
    made->registers = at::zeros({kRegisters, n, info.latent_channels, h, w}, f32);
    made->noise = at::zeros({n, info.latent_channels, h, w}, f32);
    made->scalars = at::zeros({kEvalColumns}, f32);
    made->context = at::empty(context.sizes(), context.options().dtype(dtype_));
    if (info.sdxl) {
      made->pooled = at::empty(pooled.sizes(), pooled.options().dtype(dtype_));
      made->time_ids = at::empty({context.size(0), 6}, made->context.options());
    }
    if (inpaint) made->extra = at::empty(extra_channels.sizes(), extra_channels.options().dtype(dtype_));
    for (size_t k = 0; k < controls.size(); ++k) {
      if (!active[k]) continue;
      made->controlnets.push_back(controls[k].controlnet);
      made->control_index.push_back(static_cast<int>(k));
      made->control_images.push_back(at::empty_like(controls[k].image));
      made->control_scales.push_back(at::zeros({}, f32));
      made->guess_mode.push_back(controls[k].guess_mode);
    }
    if (kind >= 0) {  // the kept state: the other kind's buffer if that step exists, else a new one
      made->deepcache = deepcache;
      made->deep_reuse = kind == 1;
      auto *other = find_call<StepCall>(*inst.step, deep_key(kind != 1));
      made->kept = other ? other->kept
                         : at::empty(deepcache->kept_shape(context.size(0), h, w), made->context.options());
    }
    made->fn = [this, c = made.get(), do_cfg, inpaint, index = inst.index] {
      at::Tensor x_in = eval_model_input(c->registers, c->scalars);
      at::Tensor x_batch = do_cfg ? at::cat({x_in, x_in}) : x_in;  // (2N, C, h, w)
      at::Tensor latents_in = x_batch.to(dtype_).contiguous();      // what a ControlNet reads
      if (inpaint) x_batch = at::cat({x_batch.to(dtype_), c->extra}, 1);  // (2N, 2C + 1, h, w)
      at::Tensor t_batch = c->scalars[kColT].expand({x_batch.size(0)}).contiguous();  // (2N,) float32
      std::vector<at::Tensor> inputs = {x_batch.to(dtype_).contiguous(), t_batch, c->context};
      if (info_.sdxl) inputs.insert(inputs.end(), {c->pooled, c->time_ids});
      at::Tensor out;
      if (c->deepcache && c->deep_reuse) {
        inputs.push_back(c->kept);
        out = c->deepcache->reuse(inputs, index).to(at::kFloat);
      } else if (c->deepcache) {
        auto [full, kept] = c->deepcache->store(inputs, index);
        c->kept.copy_(kept);
        out = full.to(at::kFloat);
      } else if (c->controlnets.empty()) {
        out = unet_->run(inputs, index).to(at::kFloat);
      } else {  // the ControlNets, then the UNet that adds their summed residuals
        std::vector<at::Tensor> residuals;
        int64_t total = latents_in.size(0);
        for (size_t k = 0; k < c->controlnets.size(); ++k) {
          int64_t rows = c->control_images[k].size(0);
          std::vector<at::Tensor> cn_inputs = {latents_in.narrow(0, total - rows, rows),
                                               t_batch.narrow(0, total - rows, rows).contiguous(),
                                               c->context.narrow(0, total - rows, rows), c->control_images[k]};
          if (info_.sdxl)
            cn_inputs.insert(cn_inputs.end(), {c->pooled.narrow(0, total - rows, rows), c->time_ids.narrow(0, total - rows, rows)});
          std::vector<at::Tensor> res = c->controlnets[k]->scaled(c->controlnets[k]->outputs(cn_inputs, index),
                                                                  c->control_scales[k], c->guess_mode[k] != 0);
          if (rows < total)  // guess mode with guidance: zero residuals for the unconditional half
            for (auto &r : res) r = at::cat({at::zeros_like(r), r});
          if (residuals.empty()) {
            residuals = std::move(res);
          } else {
            for (size_t j = 0; j < residuals.size(); ++j) residuals[j] = residuals[j] + res[j];
          }
        }
        for (auto &r : residuals) inputs.push_back(r.contiguous());
        out = c->controlnets.front()->unet(inputs, index).to(at::kFloat);
      }
      at::Tensor uncond = out;
      if (do_cfg) {
        auto halves = out.chunk(2);
        uncond = halves[0];
        out = halves[0] + (halves[1] - halves[0]) * c->scalars[kColGuidance];  // uncond + scale * (cond - uncond)
      }
      eval_update(c->registers, out, uncond, c->noise, c->scalars);
    };
    return static_cast<StepCall *>(inst.step->insert(key, std::move(made)));
  };
  // A step graph takes the request's conditioning; a later one of the run (other active
  // ControlNets, DeepCache's other kind of step) also takes the sampler state from the one before.
  auto enter = [&](StepCall *step, const at::Tensor &from) {
    step->context.copy_(context);
    if (info.sdxl) {
      step->pooled.copy_(pooled);
      // SDXL micro-conditioning: (original size, crop top-left, target size)
      at::Tensor ids = at::tensor(std::vector<float>{static_cast<float>(height), static_cast<float>(width), 0.0f, 0.0f,
                                                     static_cast<float>(height), static_cast<float>(width)});
      step->time_ids.copy_(ids.reshape({1, 6}).expand({context.size(0), 6}));
    }
    if (inpaint) step->extra.copy_(extra_channels);
    for (size_t j = 0; j < step->controlnets.size(); ++j) {
      const Control &c = controls[static_cast<size_t>(step->control_index[j])];
      step->control_images[j].copy_(c.image);
      step->control_scales[j].fill_(c.scale);
    }
    if (from.defined()) {
      step->registers.copy_(from);
    } else {
      step->registers.zero_();
      step->registers[0].copy_(start);
    }
  };

  StepCall *step = nullptr;
  int steps_done = 0;
  // step i's kind (make_step's): DeepCache's full or cached step, or -1 without DeepCache
  auto kind_at = [&](int i) { return deepcache ? (deepcache_full_step(i, p.deepcache_interval) ? 0 : 1) : -1; };
  auto run_eval = [&](const Eval &e, const at::Tensor &row) {
    int i = std::min(steps_done, loop_steps - 1);
    // the sampler state and key outlive the step they are in (making the next one may drop it from the cache)
    at::Tensor state = step ? step->registers : at::Tensor();
    std::string key = step ? step->key : std::string();
    StepCall *want = make_step(active_at(i), kind_at(i));
    if (want->key != key) {
      enter(want, state);
      step = want;
    }
    if (e.lift != 0) step->registers[0].add_(draw_noise(), e.lift);  // A1111's Restart: noise lifts x first
    if (e.noise == NoiseKind::Draw) step->noise.copy_(draw_noise());
    if (e.noise == NoiseKind::Brownian) step->noise.copy_((*brownian)(e.noise_from, e.noise_to));
    step->scalars.copy_(row);
    inst.step->run(*step);
  };
  auto end_steps = [&](int count, int latents_register, double scale) {
    for (int k = 0; k < count; ++k) {
      ++steps_done;
      if (p.progress && p.progress(p.progress_user, steps_done, loop_steps) != 0)
        throw Cancelled("cancelled by the progress callback at step " + std::to_string(steps_done));
      if (p.latents) {
        at::Tensor state = step->registers[k == 0 ? latents_register : 0];
        at::Tensor now = (scale != 1.0 ? state * scale : state).to(at::kCPU).contiguous();
        int64_t shape[4] = {now.size(0), now.size(1), now.size(2), now.size(3)};
        if (p.latents(p.latents_user, steps_done, loop_steps, now.data_ptr<float>(), shape) != 0)
          throw Cancelled("cancelled by the latents callback at step " + std::to_string(steps_done));
      }
    }
  };
  if (program.adaptive) {  // DPM adaptive: evaluations decided by its step-size controller as it goes
    step = make_step(active_at(0), kind_at(0));
    enter(step, at::Tensor());
    run_adaptive(plan, info.scheduler.prediction_type, step->registers,
                 [&](const Eval &e) { run_eval(e, eval_row(e, p.guidance_scale).to(device_)); }, draw_noise);
    end_steps(1, 0, 1.0);
  } else {
    at::Tensor table = program_table(program.evals, p.guidance_scale).to(device_);  // (evaluations, kEvalColumns)
    for (size_t k = 0; k < program.evals.size(); ++k) {
      const Eval &e = program.evals[k];
      run_eval(e, table[static_cast<int64_t>(k)]);
      end_steps(e.steps_ended, e.latents_register, e.latents_scale);
    }
  }
  double final_scale = plan.is_sigma_sampler() && plan.vp_latents ? std::pow(1 + std::pow(plan.sigmas.back(), 2), -0.5) : 1.0;
  at::Tensor latents = step->registers[0] * final_scale;

  // -- decode -------------------------------------------------------------------------
  at::Tensor z = latents / info.scaling_factor;
  if (info.has_shift) z = z + info.shift_factor;
  at::Tensor decoded = decode(z, inst);  // (N, 3, H, W)
  at::Tensor images = (decoded / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).cpu();
  return (images * 255).round().to(at::kByte).contiguous();  // (N, H, W, 3), half to even as numpy
}

}  // namespace sde
