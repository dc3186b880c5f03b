/* sdengine C API: Stable Diffusion text-to-image, image-to-image and inpainting in a library.
 *
 * One public header. Every call returns an sde_status (0 ok, negative error);
 * sde_last_error() gives the message of the calling thread's last failure. No C++
 * exception crosses this boundary. Outputs the library allocates are freed by the
 * library (sde_images_free). Callbacks live in the per-request parameters, with a
 * `void *user`, never in process-wide state.
 *
 *     sde_model_params mp;
 *     sde_model_params_init(&mp);
 *     sde_model *model;
 *     if (sde_model_load("models/sd15", &mp, &model) != SDE_OK) fprintf(stderr, "%s\n", sde_last_error());
 *     sde_gen_params gp;
 *     sde_gen_params_init(&gp);
 *     gp.prompt = "a lighthouse at dusk";
 *     sde_image *images; int count;
 *     if (sde_model_generate(model, &gp, &images, &count) == SDE_OK) { ...; sde_images_free(images, count); }
 *     sde_model_free(model);
 *
 * Threads: a loaded sde_model is shared by any number of threads calling sde_model_generate
 * at once; each request keeps its own state. sde_model_free must not race with them.
 *
 * The networks run as AOTInductor-compiled engines (`sdengine export aoti MODEL`, or built
 * on first use from Python); the weights are read from the model folder at load time.
 */
#ifndef SDENGINE_H
#define SDENGINE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(SDE_BUILDING_LIBRARY)
#    define SDE_API __declspec(dllexport)
#  else
#    define SDE_API __declspec(dllimport)
#  endif
#else
#  define SDE_API __attribute__((visibility("default")))
#endif

/* Marks a declaration kept for one release under an old name. */
#if defined(_MSC_VER)
#  define SDE_DEPRECATED(message) __declspec(deprecated(message))
#else
#  define SDE_DEPRECATED(message) __attribute__((deprecated(message)))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sde_status {
  SDE_OK = 0,
  SDE_ERR_INVALID_ARGUMENT = -1, /* a NULL pointer, a size not a multiple of 8, an unknown name, ... */
  SDE_ERR_IO = -2,               /* a file is missing or unreadable */
  SDE_ERR_FORMAT = -3,           /* a file is corrupt or does not fit the engine */
  SDE_ERR_OUT_OF_MEMORY = -4,    /* the request did not fit in memory (the message names its size and batch);
                                    what it allocated is freed, a smaller request can run next */
  SDE_ERR_DEVICE = -5,           /* the device (or the compiled engine running on it) failed */
  SDE_ERR_CANCELLED = -6,        /* the progress callback stopped the request */
  SDE_ERR_INTERNAL = -7,
} sde_status;

/* Library version, "MAJOR.MINOR.PATCH". */
SDE_API const char *sde_version(void);

/* A static description of a status code. */
SDE_API const char *sde_status_str(sde_status status);

/* The message of the calling thread's last failed call ("" if none). Valid until the
 * thread's next failing call. */
SDE_API const char *sde_last_error(void);

/* ---- Names: shared with the Python API and the CLI (sdengine/samplers/names.py) ---- */

/* Whose rules a sampler and schedule follow (README, "Same seed, same image"):
 * - diffusers': each sampler spaced and rounded as its diffusers scheduler class, the
 *   model's scheduler config read as that class reads it;
 * - A1111's: what AUTOMATIC1111's web UI draws (k-diffusion over the model's discrete sigmas,
 *   its 12 schedules, its seeds: sde_gen_params' subseed, ensd, rng).
 * SDE_CONVENTIONS_DEFAULT: diffusers' for the samplers of both vocabularies, A1111's for those
 * only A1111 has (dpmpp_2m_sde_heun, dpmpp_2s_a, dpm_fast, dpm_adaptive, restart, ddim_cfgpp).
 * sde_sampler_parse gives the conventions a name implies, as the Python API reads names. */
typedef enum sde_conventions {
  SDE_CONVENTIONS_DEFAULT = 0,
  SDE_CONVENTIONS_DIFFUSERS,
  SDE_CONVENTIONS_A1111,
  SDE_CONVENTIONS_COUNT
} sde_conventions;

/* BEGIN GENERATED ENUMS (csrc/tools/gen_sampler_names.py) */
typedef enum sde_sampler {
  SDE_SAMPLER_DEFAULT = -1, /* the model's scheduler_config.json */
  SDE_SAMPLER_EULER = 0, /* Euler */
  SDE_SAMPLER_EULER_A = 1, /* Euler a */
  SDE_SAMPLER_DDIM = 2, /* DDIM */
  SDE_SAMPLER_DPMPP_2M = 3, /* DPM++ 2M */
  SDE_SAMPLER_PNDM = 4, /* PLMS */
  SDE_SAMPLER_LMS = 5, /* LMS */
  SDE_SAMPLER_HEUN = 6, /* Heun */
  SDE_SAMPLER_DPM_2 = 7, /* DPM2 */
  SDE_SAMPLER_DPM_2_A = 8, /* DPM2 a */
  SDE_SAMPLER_DPMPP_2M_SDE = 9, /* DPM++ 2M SDE */
  SDE_SAMPLER_DPMPP_SDE = 10, /* DPM++ SDE */
  SDE_SAMPLER_DPMPP_3M_SDE = 11, /* DPM++ 3M SDE */
  SDE_SAMPLER_UNIPC = 12, /* UniPC */
  SDE_SAMPLER_LCM = 13, /* LCM */
  SDE_SAMPLER_DDPM = 14, /* DDPM */
  SDE_SAMPLER_DPMPP_2M_SDE_HEUN = 15, /* DPM++ 2M SDE Heun, A1111's rules only */
  SDE_SAMPLER_DPMPP_2S_A = 16, /* DPM++ 2S a, A1111's rules only */
  SDE_SAMPLER_DPM_FAST = 17, /* DPM fast, A1111's rules only */
  SDE_SAMPLER_DPM_ADAPTIVE = 18, /* DPM adaptive, A1111's rules only */
  SDE_SAMPLER_RESTART = 19, /* Restart, A1111's rules only */
  SDE_SAMPLER_DDIM_CFGPP = 20, /* DDIM CFG++, A1111's rules only */
  SDE_SAMPLER_COUNT
} sde_sampler;

typedef enum sde_schedule {
  SDE_SCHEDULE_DEFAULT = 0, /* what the model's scheduler config says (A1111: the sampler's own) */
  SDE_SCHEDULE_NORMAL = 1, /* Normal */
  SDE_SCHEDULE_KARRAS = 2, /* Karras */
  SDE_SCHEDULE_EXPONENTIAL = 3, /* Exponential */
  SDE_SCHEDULE_SGM_UNIFORM = 4, /* SGM Uniform */
  SDE_SCHEDULE_SIMPLE = 5, /* Simple */
  SDE_SCHEDULE_DDIM_UNIFORM = 6, /* DDIM */
  SDE_SCHEDULE_UNIFORM = 7, /* Uniform, A1111's rules only */
  SDE_SCHEDULE_POLYEXPONENTIAL = 8, /* Polyexponential, A1111's rules only */
  SDE_SCHEDULE_KL_OPTIMAL = 9, /* KL Optimal, A1111's rules only */
  SDE_SCHEDULE_ALIGN_YOUR_STEPS = 10, /* Align Your Steps, A1111's rules only */
  SDE_SCHEDULE_BETA = 11, /* Beta, A1111's rules only */
  SDE_SCHEDULE_COUNT
} sde_schedule;
/* END GENERATED ENUMS */

/* Canonical names ("euler_a", "karras"); NULL for a value out of range. */
SDE_API const char *sde_sampler_name(sde_sampler sampler);
SDE_API const char *sde_schedule_name(sde_schedule schedule);

/* Parse a sampler name: sdengine's, A1111's or ComfyUI's ("Euler a", "DPM++ 2M Karras",
 * "k_dpmpp_2m", "EulerDiscreteScheduler"). A name that carries a schedule sets *schedule
 * (schedule may be NULL; it is left alone when the name carries none). Every sampler of the
 * Python API runs here; the conventions a name implies come from sde_sampler_parse. */
SDE_API sde_status sde_sampler_from_str(const char *name, sde_sampler *sampler, sde_schedule *schedule);
SDE_API sde_status sde_schedule_from_str(const char *name, sde_schedule *schedule);

/* Parse a sampler name as the Python API does (sdengine.samplers.conventions_for): A1111's
 * spellings ("Euler a", "DPM++ 2M Karras", "k_dpmpp_2m", "DPM fast", "plms") give A1111's
 * conventions, sdengine's own names and diffusers' class names diffusers'. A schedule the name
 * carries sets *schedule (left alone otherwise); schedule and conventions may be NULL. */
SDE_API sde_status sde_sampler_parse(const char *name, sde_sampler *sampler, sde_schedule *schedule,
                                     sde_conventions *conventions);
/* Parse a schedule name in the vocabulary of `conventions`: under A1111's its labels and names
 * ("Uniform", "Align Your Steps", "SGMUniform"); under diffusers' the names of NAMES. */
SDE_API sde_status sde_schedule_parse(const char *name, sde_conventions conventions, sde_schedule *schedule);

/* ---- Models ---- */

typedef struct sde_model sde_model;

typedef struct sde_model_params {
  /* Folder of a compiled engine (engine.json, *.pt2). NULL: search the engine cache
   * ($SDE_CACHE_DIR/aoti, default ~/.cache/sdengine/aoti) for one whose networks fit the
   * model's weights, this library's torch version and the CPU. */
  const char *engine_dir;
  /* Tokenizer folder. NULL: the model folder's tokenizer/ (a single file: the engine's). */
  const char *tokenizer_dir;
  /* How many requests may run a network at the same time (compiled-model instances that
   * share the weights). 0: 4. Further requests wait for a free instance. */
  int max_concurrency;
  /* CUDA device index for a CUDA engine. -1: the current device. */
  int device_index;
  /* What the UNet predicts: "epsilon" or "v_prediction" ("eps", "v" also read). NULL: the
   * model's scheduler config; for a single file, its header's SAI Model Spec
   * (modelspec.prediction_type / modelspec.architecture), else a "v_pred" key in the file,
   * else v_prediction for SD2 and epsilon for SD1 (so a 512-base SD2 file needs "epsilon"). */
  const char *prediction_type;
  /* SDXL's second tokenizer folder. NULL: the model folder's tokenizer_2/ (a single file:
   * the engine's). */
  const char *tokenizer_2_dir;
  /* Graphs kept per instance (see max_concurrency) for each kind of call: text encoding (per
   * batch), denoising step (UNet on the doubled batch + guidance + sampler update, per batch,
   * latent size and sampler) and VAE decode (per batch and latent size); past it the least
   * recently used is dropped. On CUDA a graph is a CUDA graph, captured at a shape's first
   * call and replayed for every later call of that shape; on the CPU the same calls run
   * through a stand-in that records nothing. 0: 8. Negative: no graphs (every call launches
   * its kernels one by one; for comparisons). */
  int max_graphs;
} sde_model_params;

SDE_API void sde_model_params_init(sde_model_params *params);

/* Load a checkpoint, read here (no Python):
 * - a diffusers folder (text_encoder/, unet/, vae/, scheduler/, tokenizer/; safetensors
 *   weights, fp16 variants and shards included);
 * - a single-file .safetensors checkpoint in the original LDM / A1111 / Civitai layout
 *   (SD1, SD2 or SDXL). Its networks, scheduler defaults and CLIP tokenizer come from the engine
 *   (`sdengine export aoti FILE` builds one), which maps every file key onto the networks.
 * Pickled .ckpt files are refused (SDE_ERR_FORMAT); load them from Python. */
SDE_API sde_status sde_model_load(const char *path, const sde_model_params *params, sde_model **model);

/* A weight the caller already holds in memory (used by the Python bindings: no copy).
 * `data` is C-contiguous; it must stay valid until sde_model_free. */
typedef enum sde_dtype { SDE_DTYPE_F32 = 0, SDE_DTYPE_F16, SDE_DTYPE_BF16, SDE_DTYPE_I64, SDE_DTYPE_COUNT } sde_dtype;

typedef enum sde_device_type { SDE_DEVICE_CPU = 0, SDE_DEVICE_CUDA = 1, SDE_DEVICE_COUNT } sde_device_type;

typedef struct sde_tensor_view {
  const char *name;      /* "<component>/<key>": "unet/conv_in.weight", "text_encoder/text_model...", "vae/..." */
  void *data;
  sde_dtype dtype;
  int ndim;
  const int64_t *shape;
  sde_device_type device_type;
  int device_index;      /* the CUDA device (ignored for the CPU) */
} sde_tensor_view;

/* Load from in-memory weights. model_dir gives the configs (scheduler/, vae/config.json,
 * tokenizer/) and may be NULL when config_json (the JSON object that engine.json's "config"
 * holds) and params->tokenizer_dir are given instead. */
SDE_API sde_status sde_model_load_tensors(const sde_tensor_view *tensors, int count, const char *model_dir,
                                          const char *config_json, const sde_model_params *params,
                                          sde_model **model);

/* NULL is a no-op. */
SDE_API void sde_model_free(sde_model *model);

/* The model's native image size in pixels (e.g. 512). */
SDE_API int sde_model_default_size(const sde_model *model);

/* What one kind of graph has done since the model was loaded, over all instances. */
typedef struct sde_graph_stats {
  int64_t captures;  /* calls recorded as a graph (each also ran once) */
  int64_t replays;   /* calls replayed from a recorded graph */
  int64_t direct;    /* calls run without a graph: graphs off, or a shape whose capture failed */
  int64_t failed;    /* captures that failed (the call ran; that shape then runs without a graph) */
  int64_t evicted;   /* graphs dropped as the least recently used (max_graphs) */
  int cached;        /* graphs held now */
} sde_graph_stats;

typedef struct sde_model_stats {
  int cuda_graphs;        /* 1: calls are recorded as CUDA graphs; 0: the CPU stand-in */
  int instances;          /* instances (max_concurrency), each with its own graphs */
  sde_graph_stats text;   /* text encoding */
  sde_graph_stats step;   /* the denoising step */
  sde_graph_stats decode; /* VAE decode */
} sde_model_stats;

/* Counters of the model's graphs (thread-safe; they may move while requests run). */
SDE_API sde_status sde_model_get_stats(const sde_model *model, sde_model_stats *stats);

/* ---- ControlNets ---- */

typedef struct sde_controlnet sde_controlnet;

typedef struct sde_controlnet_params {
  /* The model the ControlNet is loaded for (required): it is checked to fit that model's UNet,
   * and runs only in requests on that model. Free the ControlNet before the model. */
  const sde_model *model;
  /* Folder of its compiled engine (controlnet_engine.json, controlnet.pt2, unet_control.pt2;
   * `sdengine export aoti MODEL --controlnet PATH` builds it). NULL: search the engine cache
   * ($SDE_CACHE_DIR/aoti) for one that fits this ControlNet and the model. */
  const char *engine_dir;
} sde_controlnet_params;

SDE_API void sde_controlnet_params_init(sde_controlnet_params *params);

/* Load a ControlNet: a diffusers ControlNetModel folder (config.json + .safetensors weights) or an
 * A1111 / Civitai single-file .safetensors (control_model.* keys, or the same without the
 * prefix). One that does not fit the model (another family or width) is SDE_ERR_FORMAT naming
 * both. Thread-safe to use from any number of requests at once. */
SDE_API sde_status sde_controlnet_load(const char *path, const sde_controlnet_params *params,
                                       sde_controlnet **controlnet);

/* NULL is a no-op. */
SDE_API void sde_controlnet_free(sde_controlnet *controlnet);

/* One ControlNet of a request (diffusers' semantics: sdengine/controlnet.py). */
typedef struct sde_control {
  const sde_controlnet *controlnet; /* required, loaded for the request's model */
  const uint8_t *image;             /* required: the control map, width x height RGB pixels (3 bytes
                                       each, row-major) at the request's size, in [0, 255] */
  double scale;                     /* multiplies its residuals; finite. Default 1 */
  double start, end;                /* the part of the run it acts in, 0 <= start <= end <= 1: step i
                                       of n runs it unless i / n < start or (i + 1) / n > end.
                                       Default 0 and 1 */
  int guess_mode;                   /* nonzero: diffusers' guess mode (the conditional half only,
                                       residuals scaled 0.1 .. 1). Default 0 */
} sde_control;

SDE_API void sde_control_init(sde_control *control);

/* ---- DeepCache ---- */

/* DeepCache (Ma et al. 2024; sdengine.DeepCache): every deepcache_interval-th step of a request
 * runs the whole UNet and keeps the state entering one skip branch's first up layer; the steps
 * between run that shallow branch only, from the kept state. A DeepCache engine holds the
 * model's UNet compiled as those two kinds of step, for one branch. */
typedef struct sde_deepcache sde_deepcache;

typedef struct sde_deepcache_params {
  /* The model it is loaded for (required); it reads that model's UNet tensors (LoRAs merged
   * with sde_model_set_loras included). Free it before the model. */
  const sde_model *model;
  /* DeepCacheSDHelper's cache_branch_id: down level branch / 3, layer branch % 3 (0, the default:
   * the shallowest and fastest). >= 0. */
  int branch;
  /* Folder of its compiled engine (deepcache_engine.json, unet_deep_store.pt2,
   * unet_deep_reuse.pt2; `sdengine export aoti MODEL --deepcache-branch B` builds it). NULL:
   * search the engine cache ($SDE_CACHE_DIR/aoti) for one of this branch that fits the model. */
  const char *engine_dir;
} sde_deepcache_params;

SDE_API void sde_deepcache_params_init(sde_deepcache_params *params);

/* Load a DeepCache engine; none that fits is SDE_ERR_FORMAT with each candidate's reason.
 * Thread-safe to use from any number of requests at once. */
SDE_API sde_status sde_deepcache_load(const sde_deepcache_params *params, sde_deepcache **deepcache);

/* NULL is a no-op. */
SDE_API void sde_deepcache_free(sde_deepcache *deepcache);

/* ---- Generation ---- */

/* Called after every model evaluation (steps of them; PNDM makes steps + 1, img2img fewer)
 * with step = 1 .. steps, on the thread that runs the request. Return nonzero to cancel the
 * request: it stops there with SDE_ERR_CANCELLED. This is the one way to cancel; to cancel
 * from another thread, let the callback read a flag that thread sets (a C11 atomic_int, a
 * std::atomic<bool>), never a plain or volatile int. */
typedef int (*sde_progress_fn)(void *user, int step, int steps);

/* Called after every step, as progress, with diffusers' latents after that step: what the
 * VAE decodes once divided by the model's scaling factor; batch_size x channels x (height / f)
 * x (width / f) floats (f: the VAE's downscale, 8 for Stable Diffusion), row-major, valid
 * during the call; shape holds those four sizes. Copying them to the host waits for the
 * device at every step: leave it NULL unless needed (previews). Return nonzero to cancel. */
typedef int (*sde_latents_fn)(void *user, int step, int steps, const float *latents, const int64_t shape[4]);

/* strength's "from the model" sentinel: 0.8 for img2img, 1.0 for inpainting. */
#define SDE_STRENGTH_DEFAULT (-1.0)
/* eta's sentinel: the rules' default (0 under diffusers', A1111's per sampler under its). */
#define SDE_ETA_DEFAULT (-1.0)

/* How a prompt is read: as plain text (the default), or in AUTOMATIC1111's syntax as the Python
 * API's prompt_syntax="a1111": emphasis `(x)`, `(x:1.5)`, `[x]`, escapes `\(`, A1111's
 * "Original" emphasis on the text encoder's output (sdengine/prompt_syntax.py). The engines'
 * UNet takes one 77-token context: a prompt that needs more than one 75-token window (longer
 * prompts, BREAK) is SDE_ERR_INVALID_ARGUMENT. <lora:...> tags are refused: merge LoRAs with
 * sde_model_set_loras. */
typedef enum sde_prompt_syntax { SDE_PROMPT_SYNTAX_PLAIN = 0, SDE_PROMPT_SYNTAX_A1111, SDE_PROMPT_SYNTAX_COUNT } sde_prompt_syntax;

/* Where A1111's random numbers come from (its "RNG" setting): torch's CPU generator (the default
 * here, as in the Python API), or "NV": CUDA's torch.randn (Philox 4x32-10 + Box-Muller) computed
 * on the host, the same numbers on any device. A1111's own default, its GPU generator, is what
 * NV reproduces. */
typedef enum sde_rng { SDE_RNG_CPU = 0, SDE_RNG_NV, SDE_RNG_COUNT } sde_rng;

typedef struct sde_gen_params {
  const char *prompt;          /* required, UTF-8 */
  const char *negative_prompt; /* NULL: "" (SDXL: zero conditioning, as diffusers'
                                  force_zeros_for_empty_prompt) */
  int width, height;           /* pixels, multiples of 8 in [8, 8192] and of the engine's cell (64 for SD1/SD2,
                                  32 for SDXL: 8 x the UNet's downsampling), width x height at most
                                  4096 x 4096. 0: the model's default size */
  int steps;                   /* in [1, 1000]; 0: 30 */
  double guidance_scale;       /* classifier-free guidance; <= 1 disables it. Default 7.5 */
  uint64_t seed;               /* image i gets seed + i (torch.manual_seed(seed + i) CPU noise); seed +
                                  batch_size - 1 must fit in uint64 */
  int batch_size;              /* images to generate, in [1, 64]; default 1 */
  sde_sampler sampler;         /* SDE_SAMPLER_DEFAULT: the model's scheduler */
  sde_schedule schedule;       /* SDE_SCHEDULE_DEFAULT: the scheduler config's */
  double eta;                  /* the noise scale of DDIM (diffusers' rules) or of A1111's ancestral, SDE and
                                  DDIM samplers, finite and >= 0. SDE_ETA_DEFAULT (the default): 0 under
                                  diffusers' rules (deterministic DDIM), A1111's default under its rules
                                  (1; 0 for DDIM) */
  sde_progress_fn progress;    /* NULL: none; returning nonzero cancels */
  void *progress_user;         /* passed to progress */
  /* img2img: NULL for text-to-image; else the image to start from, width x height RGB
   * pixels (3 bytes each, row-major), the same image for every image of the batch. Needs
   * width and height set (its size). Encoded by the engine's VAE encoder, sampled from
   * its posterior with each image's seed, then noised to the first kept step. */
  const uint8_t *init_image;
  /* Inpainting (a 9-channel inpainting model; needs init_image): width x height bytes, one
   * per pixel, row-major; >= 128 (white) is repainted, < 128 kept. NULL: no inpainting. */
  const uint8_t *mask_image;
  double strength;             /* img2img / inpainting: the part of the schedule re-run, in
                                  [0, 1] as in Python (one that leaves no step, such as 0, is
                                  an error); 1 keeps nothing of the init image but (inpainting)
                                  its unmasked part. SDE_STRENGTH_DEFAULT (the default): 0.8
                                  for img2img, 1.0 for inpainting. Without init_image it must
                                  stay SDE_STRENGTH_DEFAULT */
  sde_latents_fn latents;      /* NULL: none; returning nonzero cancels */
  void *latents_user;          /* passed to latents */
  /* ControlNets: control_count entries (at most 8), their residuals summed into the UNet's.
   * NULL / 0: none. */
  const sde_control *controls;
  int control_count;
  /* Whose rules the sampler and schedule follow (see sde_conventions). Default
   * SDE_CONVENTIONS_DEFAULT. */
  sde_conventions conventions;
  /* Explicit initial noise: batch_size x C x (height / f) x (width / f) floats of unit variance
   * (f: the VAE's downscale), row-major, as the Python API's `latents`; the sampler scales it as
   * it would its drawn noise, and later draws still come from the seeds. NULL: drawn from the
   * seeds. Read during the call only. */
  const float *latents_in;
  /* A1111's seeds (A1111's rules only; SDE_ERR_INVALID_ARGUMENT under diffusers'): a variation
   * seed mixed into the start by spherical interpolation with weight subseed_strength (in
   * [0, 1]; 0, the default, turns it off; with it every image keeps `seed` and image i gets
   * subseed + i); the seed's noise drawn at seed_resize_from_w x seed_resize_from_h pixels and
   * pasted centred (0: off); ENSD: the ancestral and SDE noise after the start drawn from
   * seed + eta_noise_seed_delta (0: off); the source of the draws. */
  uint64_t subseed;
  double subseed_strength;
  int seed_resize_from_w, seed_resize_from_h;
  int64_t eta_noise_seed_delta;
  sde_rng rng;
  sde_prompt_syntax prompt_syntax; /* how prompt and negative_prompt are read; default plain */
  /* Text-encoder layers to skip, diffusers' clip_skip (A1111's "Clip skip" minus 1), for every
   * text encoder: 0 (the default) conditions on the last layer's output (SDXL: the penultimate);
   * k on the output of the layer k before it, through the final LayerNorm for SD1 / SD2 (none
   * for SDXL). In [0, N - 1] with N the layers of the shallowest text encoder (SDXL, already on
   * the penultimate layer: [0, N - 2]), as sdengine/request.py; any other value is
   * SDE_ERR_INVALID_ARGUMENT naming clip_skip. */
  int clip_skip;
  /* A1111 syntax: prompt and negative prompt are read as A1111 reads them, in windows of 75
   * tokens (a longer prompt, BREAK), both as many windows as the longer needs, and the UNet
   * conditions on 77 tokens per window. prompt_windows asks for at least this many (0, the
   * default: as many as the prompts need), so that a batch of different prompts, sent as one
   * request per prompt, takes the windows its longest prompt needs, as the Python pipeline pads
   * a batch. In [0, 4096]; more windows than the engine's UNet takes (engine.json
   * max_prompt_windows: 32, 1 for a static UNet) is SDE_ERR_INVALID_ARGUMENT. */
  int prompt_windows;
  /* DeepCache: 0 (the default) off; k >= 1: steps 0, k, 2k, ... of the run are full steps and
   * the others cached (sdengine.DeepCache(interval=k)), with `deepcache` (required then, loaded
   * for this model). Does not combine with ControlNets in the C++ loop. In [0, 1000]. */
  int deepcache_interval;
  const sde_deepcache *deepcache;
  /* The branch the request asks for (A1111 infotext's "DeepCache branch", which
   * sde_gen_params_from_infotext sets): -1 (the default) takes deepcache's; else it must be
   * deepcache's. */
  int deepcache_branch;
} sde_gen_params;

SDE_API void sde_gen_params_init(sde_gen_params *params);

typedef struct sde_image {
  int width, height;
  int channels;  /* 3: RGB */
  uint64_t seed;
  uint8_t *data; /* height * width * channels bytes, row-major */
} sde_image;

/* Generate params->batch_size images. On success *images holds *count images, to be freed
 * with sde_images_free; on failure *images is NULL and *count 0. Thread-safe. A bad
 * parameter is SDE_ERR_INVALID_ARGUMENT with a message that names it in the words of the
 * Python API (sdengine/request.py); a request that does not fit in memory is
 * SDE_ERR_OUT_OF_MEMORY. A cancelled request frees everything it allocated. */
SDE_API sde_status sde_model_generate(sde_model *model, const sde_gen_params *params, sde_image **images, int *count);

/* The old name of sde_model_generate, kept for one release. */
SDE_DEPRECATED("use sde_model_generate")
SDE_API sde_status sde_generate(sde_model *model, const sde_gen_params *params, sde_image **images, int *count);

/* NULL is a no-op. */
SDE_API void sde_images_free(sde_image *images, int count);

/* ---- LoRA and textual inversion ---- */

/* One LoRA of a set: a kohya / A1111 (lora_unet_*, lora_te_*, lora_te1_* / lora_te2_*) or
 * diffusers / PEFT (unet.*.lora_A.weight ...) .safetensors file, and its scale. */
typedef struct sde_lora {
  const char *path;
  float scale;
} sde_lora;

/* Merge a set of LoRAs into the model's weights, replacing the set merged now; count 0
 * restores the checkpoint's weights bit for bit. The LoRA is merged into the tensors the
 * compiled networks already read: nothing is recompiled. The first change of a weight keeps
 * a copy of its value (the touched weights only; kept for the next swap). Every file is read
 * and checked (keys against the engine's LoRA name table, ranks, shapes) before any weight
 * changes: on an error (SDE_ERR_FORMAT / SDE_ERR_IO naming the file and key) the weights keep
 * their values.
 * Threads: the call waits for the requests running on the model to finish, and requests that
 * start meanwhile wait for it (a readers-writer lock): every request runs with one whole set,
 * the one merged when it started. The weights of sde_model_load_tensors are the caller's:
 * they are changed in place. */
SDE_API sde_status sde_model_set_loras(sde_model *model, const sde_lora *loras, int count);

/* Add a textual-inversion embedding (.safetensors: A1111's emb_params, diffusers' {token:
 * vector}, SDXL's clip_l + clip_g) as a new token of the tokenizer(s): `token`, or NULL for the
 * file's (a diffusers file's key, else the file name without .safetensors). Its vectors go into
 * the engine's added-token tables (256 vectors in all per text encoder). A token that already
 * exists, a width that does not fit or a full table is an error and changes nothing. Waits
 * like sde_model_set_loras. */
SDE_API sde_status sde_model_load_embedding(sde_model *model, const char *path, const char *token);

/* Teach the tokenizer(s) a textual-inversion token whose vectors the caller already wrote into the
 * added-token tables of its in-memory weights (sde_model_load_tensors: each text encoder's
 * "text_model.embeddings.added_tokens", row r being id vocab_size + r). ids / count: its ids for
 * the first text encoder; ids_2 / count_2: SDXL's second (NULL / 0 otherwise). A token that
 * already exists is an error and changes nothing. Waits like sde_model_set_loras. */
SDE_API sde_status sde_model_add_token(sde_model *model, const char *token, const int32_t *ids, int count,
                                       const int32_t *ids_2, int count_2);

/* ---- A1111's infotext ---- */

typedef struct sde_infotext sde_infotext;

/* Read AUTOMATIC1111's `parameters` text (a PNG's text chunk, A1111's API `info`) into *params,
 * with the rules of the Python API (sdengine/infotext.py, Request.from_infotext): its prompts
 * (A1111 prompt syntax), Steps, Sampler, Schedule type, CFG scale, Seed, Size, ENSD, Variation
 * seed and strength, Seed resize from, RNG (no RNG field is A1111's GPU generator, whose numbers
 * SDE_RNG_NV draws), Eta and Denoising strength, under A1111's rules unless its "Sampler
 * conventions" says diffusers; "Clip skip: N" sets clip_skip to N - 1 (A1111 counts the last
 * layer too); "DeepCache interval" and "DeepCache branch" set deepcache_interval and
 * deepcache_branch (the caller loads the engine and sets deepcache). Fields absent take A1111's defaults (20 steps, DPM++ 2M, CFG 7);
 * fields that do not change the image (Model, hashes, Version) are kept in *info. Every other
 * field is SDE_ERR_INVALID_ARGUMENT naming it. Initialize *params first (sde_gen_params_init): fields the
 * text does not set keep their values; "Denoising strength" sets strength, and the caller gives
 * init_image. params->prompt and negative_prompt point into *info: free it with
 * sde_infotext_free after the request. */
SDE_API sde_status sde_gen_params_from_infotext(const char *text, sde_gen_params *params, sde_infotext **info);
/* A field's value as text ("Model", "Version", ...), NULL when absent; valid until sde_infotext_free. */
SDE_API const char *sde_infotext_field(const sde_infotext *info, const char *key);
/* NULL is a no-op. */
SDE_API void sde_infotext_free(sde_infotext *info);

/* ---- Tokenizer (CLIP BPE; the same ids as sdengine.tokenizer.CLIPTokenizer) ---- */

typedef struct sde_tokenizer sde_tokenizer;

/* A Hugging Face tokenizer folder (vocab.json + merges.txt, or tokenizer.json). */
SDE_API sde_status sde_tokenizer_load(const char *folder, sde_tokenizer **tokenizer);
SDE_API void sde_tokenizer_free(sde_tokenizer *tokenizer);
/* The BPE ids of text, without BOS / EOS / padding. Writes min(*count, capacity) ids and
 * sets *count to the full number (call with capacity 0 to size the buffer). */
SDE_API sde_status sde_tokenizer_encode(const sde_tokenizer *tokenizer, const char *text, int32_t *ids,
                                        int capacity, int *count);

#ifdef __cplusplus
}
#endif
#endif /* SDENGINE_H */
