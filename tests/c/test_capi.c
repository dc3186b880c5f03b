/* C-level tests of libsdengine, driven by tests/test_native_capi.py.
 *
 *   sde_capi_test args    MODEL_DIR ENGINE_DIR CORRUPT_DIR   bad arguments -> statuses + messages
 *   sde_capi_test threads MODEL_DIR ENGINE_DIR THREADS REPEATS  one model shared by threads == serial
 *   sde_capi_test rss     MODEL_DIR ENGINE_DIR COUNT [MAX%]    RSS grows at most MAX% (2) over COUNT generations
 *   sde_capi_test soak    MODEL_DIR ENGINE_DIR THREADS REQUESTS CANCEL%
 *       THREADS x REQUESTS requests on one model, CANCEL% of them cancelled at a random step by
 *       their progress callback: each uncancelled image equals its serial twin, each cancelled
 *       request returns SDE_ERR_CANCELLED with no images, the model still serves afterwards
 *       (run under LeakSanitizer: cancelled requests free everything)
 *   sde_capi_test controlnet MODEL_DIR ENGINE_DIR CN0 CN1 CN_ENGINE IMAGE0 IMAGE1 W H OUT MISFIT
 *       two ControlNets in one request (the image to OUT, compared with Python), and bad controls
 *   sde_capi_test oom     MODEL_DIR ENGINE_DIR                 a request too big for the address space
 *       limit (setrlimit) fails with SDE_ERR_OUT_OF_MEMORY naming its size and batch, and the next
 *       request succeeds with the same image as before (not under ASan, which reserves the space)
 *
 * Each check prints "ok <name>" or "FAIL <name>: <why>"; the exit status is the number of failures.
 */
#define _POSIX_C_SOURCE 200809L /* rand_r, setrlimit */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sdengine.h"

static int failures = 0;

static void expect(int cond, const char *name, const char *why) {
  if (cond) {
    printf("ok %s\n", name);
  } else {
    printf("FAIL %s: %s\n", name, why);
    failures++;
  }
  fflush(stdout);
}

/* status == want and sde_last_error() mentions `needle`. */
static void expect_status(sde_status got, sde_status want, const char *needle, const char *name) {
  char why[1024];
  const char *msg = sde_last_error();
  snprintf(why, sizeof why, "status %d (%s), wanted %d (%s); message: %s", got, sde_status_str(got), want,
           sde_status_str(want), msg);
  expect(got == want && (!needle || strstr(msg, needle) != NULL), name, why);
}

static sde_model *load(const char *model_dir, const char *engine_dir, int concurrency) {
  sde_model_params mp;
  sde_model_params_init(&mp);
  mp.engine_dir = engine_dir;
  mp.max_concurrency = concurrency;
  sde_model *model = NULL;
  sde_status s = sde_model_load(model_dir, &mp, &model);
  if (s != SDE_OK) {
    printf("FAIL load: %s\n", sde_last_error());
    exit(100);
  }
  return model;
}

static void small_request(sde_gen_params *gp, uint64_t seed) {
  sde_gen_params_init(gp);
  gp->prompt = "a tiny red square";
  gp->negative_prompt = "blurry";
  gp->width = 16;
  gp->height = 16;
  gp->steps = 2;
  gp->seed = seed;
  gp->sampler = SDE_SAMPLER_EULER_A;
}

/* The first image of a small request (16x16 RGB, malloc'd: the caller frees it), NULL when it failed. */
static unsigned char *small_image(sde_model *model, const sde_gen_params *gp, const char *name) {
  sde_image *images = NULL;
  int count = 0;
  sde_status st = sde_model_generate(model, gp, &images, &count);
  expect_status(st, SDE_OK, NULL, name);
  if (st != SDE_OK) return NULL;
  unsigned char *copy = malloc(16 * 16 * 3);
  memcpy(copy, images[0].data, 16 * 16 * 3);
  sde_images_free(images, count);
  return copy;
}

static int cancel_at_step_1(void *user, int step, int steps) {
  (void)steps;
  *(int *)user = step;
  return step >= 1;
}

/* Another thread's cancel request, read by the progress callback (the one way to cancel). */
static void *set_flag(void *flag) {
  atomic_store((atomic_int *)flag, 1);
  return NULL;
}

static int cancel_when_flagged(void *user, int step, int steps) {
  (void)step;
  (void)steps;
  return atomic_load((atomic_int *)user);
}

static int test_args(const char *model_dir, const char *engine_dir, const char *corrupt_dir) {
  sde_model *model = NULL;
  sde_image *images = NULL;
  int count = 0;
  sde_gen_params gp;
  sde_model_params mp;
  sde_model_params_init(&mp);
  mp.engine_dir = engine_dir;

  /* null pointers */
  expect_status(sde_model_load(NULL, &mp, &model), SDE_ERR_INVALID_ARGUMENT, "path is NULL", "load_null_path");
  expect(model == NULL, "load_null_path_leaves_null", "model was set");
  expect_status(sde_model_load(model_dir, &mp, NULL), SDE_ERR_INVALID_ARGUMENT, "model is NULL", "load_null_out");
  small_request(&gp, 1);
  expect_status(sde_model_generate(NULL, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "model is NULL", "generate_null_model");
  /* missing file */
  expect_status(sde_model_load("/nonexistent/sdengine-model", &mp, &model), SDE_ERR_IO, "/nonexistent/sdengine-model",
                "load_missing_folder");
  /* corrupt safetensors */
  expect_status(sde_model_load(corrupt_dir, &mp, &model), SDE_ERR_FORMAT, "safetensors", "load_corrupt_safetensors");
  /* missing engine */
  sde_model_params bad_engine = mp;
  bad_engine.engine_dir = "/nonexistent/sdengine-engine";
  expect_status(sde_model_load(model_dir, &bad_engine, &model), SDE_ERR_IO, "engine.json", "load_missing_engine");
  /* unknown sampler names */
  sde_sampler sampler;
  sde_schedule schedule = SDE_SCHEDULE_DEFAULT;
  expect_status(sde_sampler_from_str("no such sampler", &sampler, &schedule), SDE_ERR_INVALID_ARGUMENT,
                "unknown sampler", "sampler_unknown");
  expect_status(sde_sampler_from_str("heun", &sampler, &schedule), SDE_OK, NULL, "sampler_heun");
  expect(sampler == SDE_SAMPLER_HEUN, "sampler_heun_value", "heun did not give SDE_SAMPLER_HEUN");
  sde_conventions conventions = SDE_CONVENTIONS_DEFAULT;
  schedule = SDE_SCHEDULE_DEFAULT;
  expect_status(sde_sampler_parse("DPM fast", &sampler, &schedule, &conventions), SDE_OK, NULL, "sampler_parse_a1111");
  expect(sampler == SDE_SAMPLER_DPM_FAST && conventions == SDE_CONVENTIONS_A1111, "sampler_parse_a1111_value",
         "DPM fast did not give dpm_fast under A1111's rules");
  expect_status(sde_schedule_parse("Align Your Steps", SDE_CONVENTIONS_A1111, &schedule), SDE_OK, NULL, "schedule_parse");
  expect(schedule == SDE_SCHEDULE_ALIGN_YOUR_STEPS, "schedule_parse_value", "Align Your Steps");
  expect_status(sde_schedule_parse("Align Your Steps", SDE_CONVENTIONS_DIFFUSERS, &schedule), SDE_ERR_INVALID_ARGUMENT,
                "unknown schedule", "schedule_parse_diffusers");
  expect_status(sde_sampler_from_str(NULL, &sampler, &schedule), SDE_ERR_INVALID_ARGUMENT, "name is NULL",
                "sampler_null");
  expect_status(sde_sampler_from_str("DPM++ 2M Karras", &sampler, &schedule), SDE_OK, NULL, "sampler_a1111");
  expect(sampler == SDE_SAMPLER_DPMPP_2M && schedule == SDE_SCHEDULE_KARRAS, "sampler_a1111_value",
         "DPM++ 2M Karras did not give dpmpp_2m + karras");
  expect(!strcmp(sde_sampler_name(SDE_SAMPLER_EULER_A), "euler_a") && sde_sampler_name(SDE_SAMPLER_COUNT) == NULL,
         "sampler_name", "sde_sampler_name");
  expect_status(sde_schedule_from_str("weird", &schedule), SDE_ERR_INVALID_ARGUMENT, "unknown schedule",
                "schedule_unknown");

  model = load(model_dir, engine_dir, 2);
  small_request(&gp, 1);
  expect_status(sde_model_generate(model, NULL, &images, &count), SDE_ERR_INVALID_ARGUMENT, "params is NULL", "generate_null_params");
  expect_status(sde_model_generate(model, &gp, NULL, &count), SDE_ERR_INVALID_ARGUMENT, "images is NULL", "generate_null_images");
  expect_status(sde_model_generate(model, &gp, &images, NULL), SDE_ERR_INVALID_ARGUMENT, "count is NULL", "generate_null_count");
  gp.prompt = NULL;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "prompt is NULL", "generate_null_prompt");
  /* size not a multiple of 8 */
  small_request(&gp, 1);
  gp.width = 20;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "width must be", "generate_width_not_8");
  expect(images == NULL && count == 0, "failed_generate_outputs_cleared", "images/count set on failure");
  small_request(&gp, 1);
  gp.height = -8;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "height must be", "generate_height_negative");
  /* unknown sampler value */
  small_request(&gp, 1);
  gp.sampler = (sde_sampler)42;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "sampler out of range",
                "generate_sampler_out_of_range");
  small_request(&gp, 1);
  gp.sampler = SDE_SAMPLER_DDIM;
  gp.schedule = SDE_SCHEDULE_KARRAS;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "cannot follow",
                "generate_ddim_karras");
  small_request(&gp, 1);
  gp.steps = -1;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "steps", "generate_bad_steps");
  small_request(&gp, 1);
  gp.batch_size = 0;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "batch_size", "generate_bad_batch");
  /* img2img: the init image needs its size, strength in (0, 1] that leaves a step */
  static uint8_t init_image[16 * 16 * 3];
  for (size_t i = 0; i < sizeof init_image; ++i) init_image[i] = (uint8_t)(i * 7);
  small_request(&gp, 1);
  gp.init_image = init_image;
  gp.width = 0;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "init_image needs width",
                "img2img_without_size");
  small_request(&gp, 1);
  gp.init_image = init_image;
  gp.strength = 1.5;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "strength must be a number in [0, 1]",
                "img2img_strength_out_of_range");
  small_request(&gp, 1);
  gp.init_image = init_image;
  gp.strength = 0.0; /* a valid value, as in Python: no step left, not "the default" */
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "leaves no denoising step",
                "img2img_strength_zero_is_not_default");
  small_request(&gp, 1);
  gp.strength = 0.5; /* as Python: strength needs an init image */
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT,
                "strength applies to img2img", "strength_without_init_image");
  small_request(&gp, 1);
  gp.init_image = init_image;
  gp.strength = 0.2; /* 2 steps x 0.2 keeps none */
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "leaves no denoising step",
                "img2img_strength_no_step");
  static uint8_t mask_image[16 * 16];
  memset(mask_image, 255, sizeof mask_image);
  small_request(&gp, 1);
  gp.mask_image = mask_image;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "mask_image needs init_image",
                "inpaint_without_init_image");
  small_request(&gp, 1);
  gp.init_image = init_image;
  gp.mask_image = mask_image;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "needs an inpainting model",
                "inpaint_with_text_to_image_model");
  /* clip_skip: the tiny text encoder has 2 layers, so 0 (the default) and 1 run, and 1 conditions on another layer */
  small_request(&gp, 1);
  expect(gp.clip_skip == 0, "clip_skip_default", "sde_gen_params_init left clip_skip nonzero");
  gp.clip_skip = 2;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT,
                "clip_skip must be an integer in [0, 1] (the text encoder has 2 layers), got 2", "clip_skip_past_encoder");
  gp.clip_skip = -1;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT,
                "clip_skip must be an integer in [0, 1000], got -1", "clip_skip_negative");
  unsigned char *by_skip[2] = {NULL, NULL};
  for (int skip = 0; skip < 2; ++skip) {
    gp.clip_skip = skip;
    by_skip[skip] = small_image(model, &gp, skip ? "clip_skip_1_ok" : "clip_skip_0_ok");
  }
  expect(by_skip[0] && by_skip[1] && memcmp(by_skip[0], by_skip[1], 16 * 16 * 3), "clip_skip_changes_image",
         "clip_skip 1 gave clip_skip 0's image");
  free(by_skip[0]);
  free(by_skip[1]);
  /* A1111 prompts over one 75-token window: BREAK gives a second window (a 154-token context), which
   * conditions differently from the same words in one window; prompt_windows pads to more windows */
  small_request(&gp, 1);
  expect(gp.prompt_windows == 0, "prompt_windows_default", "sde_gen_params_init left prompt_windows nonzero");
  gp.prompt_syntax = SDE_PROMPT_SYNTAX_A1111;
  gp.prompt_windows = -1;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT,
                "prompt_windows must be an integer in [0, 4096] (0: as the prompts need), got -1", "prompt_windows_negative");
  gp.prompt_windows = 33;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT,
                "the prompt needs 33 windows of 75 tokens (a longer prompt, or BREAK) but this engine's UNet takes at most 32",
                "prompt_windows_past_engine");
  const char *window_prompts[3] = {"a cat, a dog", "a cat BREAK a dog", "a cat, a dog"};
  unsigned char *by_windows[3] = {NULL, NULL, NULL};
  for (int k = 0; k < 3; ++k) {
    gp.prompt = window_prompts[k];
    gp.prompt_windows = k == 2 ? 3 : 0;
    by_windows[k] = small_image(model, &gp, k == 0 ? "one_window_ok" : k == 1 ? "break_two_windows_ok" : "three_windows_ok");
  }
  expect(by_windows[0] && by_windows[1] && memcmp(by_windows[0], by_windows[1], 16 * 16 * 3), "break_changes_image",
         "BREAK gave the one-window prompt's image");
  expect(by_windows[0] && by_windows[2] && memcmp(by_windows[0], by_windows[2], 16 * 16 * 3), "padded_windows_change_image",
         "prompt_windows 3 gave the one-window image");
  for (int k = 0; k < 3; ++k) free(by_windows[k]);
  small_request(&gp, 1);
  gp.init_image = init_image;
  gp.strength = 0.5;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_OK, NULL, "img2img_ok");
  expect(count == 1 && images && images[0].width == 16, "img2img_ok_shape", "wrong image count or size");
  sde_images_free(images, count);
  images = NULL;
  count = 0;
  small_request(&gp, 1);
  gp.prompt = "\xff\xfe broken utf-8";
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_INVALID_ARGUMENT, "UTF-8", "generate_bad_utf8");
  /* cancel from the progress callback */
  small_request(&gp, 1);
  int last_step = 0;
  gp.steps = 4;
  gp.progress = cancel_at_step_1;
  gp.progress_user = &last_step;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_CANCELLED, "progress callback", "generate_cancel_callback");
  expect(last_step == 1 && images == NULL, "cancel_stops_at_step", "the loop went on after the callback cancelled");
  /* cancel from another thread: it sets an atomic flag the progress callback reads */
  small_request(&gp, 1);
  atomic_int flag;
  atomic_init(&flag, 0);
  gp.steps = 4;
  gp.progress = cancel_when_flagged;
  gp.progress_user = &flag;
  pthread_t canceller;
  pthread_create(&canceller, NULL, set_flag, &flag);
  pthread_join(canceller, NULL);
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_ERR_CANCELLED, "progress callback at step 1",
                "generate_cancel_from_other_thread");
  /* the old name, kept for one release, still works */
  small_request(&gp, 3);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  sde_status old_name = sde_generate(model, &gp, &images, &count);
#pragma GCC diagnostic pop
  expect_status(old_name, SDE_OK, NULL, "deprecated_sde_generate");
  sde_images_free(images, count);
  images = NULL;
  count = 0;
  /* a good request still works after all that */
  small_request(&gp, 1);
  gp.batch_size = 2;
  sde_status s = sde_model_generate(model, &gp, &images, &count);
  expect_status(s, SDE_OK, NULL, "generate_ok");
  if (s == SDE_OK) {
    expect(count == 2 && images[0].width == 16 && images[0].height == 16 && images[0].channels == 3 &&
               images[0].seed == 1 && images[1].seed == 2,
           "generate_ok_shape", "wrong count, size or seeds");
    sde_images_free(images, count);
  }
  sde_images_free(NULL, 0);
  sde_model_free(NULL);
  sde_model_free(model);
  return failures;
}

/* ---- threads ---- */

#define MAX_JOBS 1024
typedef struct {
  sde_model *model;
  int first, count;
  unsigned char *results[MAX_JOBS];
  sde_status status;
} worker_arg;

/* The first image of one request, copied (the caller frees it); NULL with *status set on error. */
static unsigned char *first_image(sde_model *model, const sde_gen_params *gp, sde_status *status) {
  sde_image *images = NULL;
  int count = 0;
  *status = sde_model_generate(model, gp, &images, &count);
  if (*status != SDE_OK) return NULL;
  size_t bytes = (size_t)images[0].width * images[0].height * 3;
  unsigned char *copy = malloc(bytes);
  memcpy(copy, images[0].data, bytes);
  sde_images_free(images, count);
  return copy;
}

static const char *job_sampler(int job) {
  static const char *names[] = {"euler_a", "euler", "dpmpp_2m_karras", "ddim"};
  return names[job % 4];
}

static unsigned char *run_job(sde_model *model, int job, sde_status *status) {
  sde_gen_params gp;
  small_request(&gp, 1000 + (uint64_t)job);
  sde_sampler_from_str(job_sampler(job), &gp.sampler, &gp.schedule);
  return first_image(model, &gp, status);
}

static void *worker(void *p) {
  worker_arg *w = (worker_arg *)p;
  w->status = SDE_OK;
  for (int i = 0; i < w->count; ++i) {
    sde_status s;
    w->results[i] = run_job(w->model, w->first + i, &s);
    if (s != SDE_OK) w->status = s;
  }
  return NULL;
}

static int test_threads(const char *model_dir, const char *engine_dir, int threads, int repeats) {
  sde_model *model = load(model_dir, engine_dir, threads);
  int jobs = threads * repeats;
  if (jobs > MAX_JOBS) jobs = MAX_JOBS;
  size_t bytes = 16 * 16 * 3;
  unsigned char **serial = calloc((size_t)jobs, sizeof *serial);
  for (int j = 0; j < jobs; ++j) {
    sde_status s;
    serial[j] = run_job(model, j, &s);
    if (!serial[j]) {
      printf("FAIL serial job %d: %s\n", j, sde_last_error());
      return 1;
    }
  }
  worker_arg *args = calloc((size_t)threads, sizeof *args);
  pthread_t *ids = calloc((size_t)threads, sizeof *ids);
  for (int t = 0; t < threads; ++t) {
    args[t].model = model;
    args[t].first = t * repeats;
    args[t].count = repeats;
    pthread_create(&ids[t], NULL, worker, &args[t]);
  }
  for (int t = 0; t < threads; ++t) pthread_join(ids[t], NULL);
  int mismatches = 0, errors = 0;
  for (int t = 0; t < threads; ++t) {
    if (args[t].status != SDE_OK) errors++;
    for (int i = 0; i < repeats; ++i) {
      unsigned char *r = args[t].results[i];
      if (!r || memcmp(r, serial[t * repeats + i], bytes) != 0) mismatches++;
      free(r);
    }
  }
  char why[256];
  snprintf(why, sizeof why, "%d of %d threaded results differ from the serial ones, %d threads failed", mismatches, jobs,
           errors);
  expect(mismatches == 0 && errors == 0, "threads_equal_serial", why);
  for (int j = 0; j < jobs; ++j) free(serial[j]);
  free(serial);
  free(args);
  free(ids);
  sde_model_free(model);
  return failures;
}

/* ---- every sampler: one request each, then 8 threads mixing them on one model ---- */

typedef struct {
  sde_sampler sampler;
  sde_conventions conventions;
  sde_schedule schedule;
} sampler_case;

static int sampler_cases(sampler_case *out) {
  int n = 0;
  for (int s = 0; s < SDE_SAMPLER_COUNT; ++s) {
    /* diffusers' rules: the samplers of both vocabularies (A1111's own ones are A1111's only) */
    if (s < SDE_SAMPLER_DPMPP_2M_SDE_HEUN) out[n++] = (sampler_case){(sde_sampler)s, SDE_CONVENTIONS_DIFFUSERS, SDE_SCHEDULE_DEFAULT};
    /* A1111's rules: its 20 samplers (DDPM is not one of them) */
    if (s != SDE_SAMPLER_DDPM)
      out[n++] = (sampler_case){(sde_sampler)s, SDE_CONVENTIONS_A1111, s == SDE_SAMPLER_EULER ? SDE_SCHEDULE_BETA : SDE_SCHEDULE_DEFAULT};
  }
  return n;
}

static unsigned char *run_case(sde_model *model, const sampler_case *c, uint64_t seed, sde_status *status) {
  sde_gen_params gp;
  small_request(&gp, seed);
  gp.steps = 4;
  gp.sampler = c->sampler;
  gp.schedule = c->schedule;
  gp.conventions = c->conventions;
  if (c->conventions == SDE_CONVENTIONS_A1111 && c->sampler == SDE_SAMPLER_EULER_A) {
    gp.subseed = 3, gp.subseed_strength = 0.5, gp.eta_noise_seed_delta = 31337, gp.rng = SDE_RNG_NV;
  }
  return first_image(model, &gp, status);
}

typedef struct {
  sde_model *model;
  sampler_case *cases;
  int n_cases, first, count;
  unsigned char *results[64];
  sde_status status;
} sampler_worker_arg;

static void *sampler_worker(void *p) {
  sampler_worker_arg *a = p;
  a->status = SDE_OK;
  for (int i = 0; i < a->count; ++i) {
    int j = a->first + i;
    sde_status s;
    a->results[i] = run_case(a->model, &a->cases[j % a->n_cases], (uint64_t)j, &s);
    if (s != SDE_OK) a->status = s;
  }
  return NULL;
}

static int test_samplers(const char *model_dir, const char *engine_dir, int threads) {
  sde_model *model = load(model_dir, engine_dir, threads);
  sampler_case cases[2 * SDE_SAMPLER_COUNT];
  int n = sampler_cases(cases);
  size_t bytes = 16 * 16 * 3;
  int jobs = n > 8 * 8 ? 8 * 8 : n;
  if (jobs < threads) jobs = threads;
  unsigned char **serial = calloc((size_t)jobs, sizeof *serial);
  for (int j = 0; j < jobs; ++j) {
    sde_status s;
    serial[j] = run_case(model, &cases[j % n], (uint64_t)j, &s);
    char name[96], why[1024];
    snprintf(name, sizeof name, "sampler_%s_%s", sde_sampler_name(cases[j % n].sampler),
             cases[j % n].conventions == SDE_CONVENTIONS_A1111 ? "a1111" : "diffusers");
    snprintf(why, sizeof why, "status %d: %s", s, sde_last_error());
    if (j < n) expect(s == SDE_OK, name, why);
  }
  /* threads x (jobs / threads) requests, each thread walking through other samplers */
  sampler_worker_arg *args = calloc((size_t)threads, sizeof *args);
  pthread_t *ids = calloc((size_t)threads, sizeof *ids);
  int per = jobs / threads;
  for (int t = 0; t < threads; ++t) {
    args[t] = (sampler_worker_arg){model, cases, n, t * per, per, {0}, SDE_OK};
    pthread_create(&ids[t], NULL, sampler_worker, &args[t]);
  }
  for (int t = 0; t < threads; ++t) pthread_join(ids[t], NULL);
  int mismatches = 0, errors = 0;
  for (int t = 0; t < threads; ++t) {
    if (args[t].status != SDE_OK) errors++;
    for (int i = 0; i < per; ++i) {
      unsigned char *r = args[t].results[i];
      if (!r || !serial[t * per + i] || memcmp(r, serial[t * per + i], bytes) != 0) mismatches++;
      free(r);
    }
  }
  char why[256];
  snprintf(why, sizeof why, "%d of %d threaded results differ from the serial ones, %d threads failed", mismatches,
           threads * per, errors);
  expect(mismatches == 0 && errors == 0, "sampler_threads_equal_serial", why);
  for (int j = 0; j < jobs; ++j) free(serial[j]);
  free(serial);
  free(args);
  free(ids);

  /* An A1111 infotext read into a request and run (its prompt in A1111's syntax, NV, variation seed, ENSD,
   * clip skip: A1111's "Clip skip: 2" is clip_skip 1). */
  sde_gen_params gp;
  sde_infotext *info = NULL;
  sde_gen_params_init(&gp);
  expect_status(sde_gen_params_from_infotext("a (red:1.2) [square]\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, "
                                             "Schedule type: Karras, CFG scale: 6, Seed: 21, Size: 16x16, Variation seed: 5, "
                                             "Variation seed strength: 0.3, ENSD: 31337, RNG: NV, Clip skip: 2, "
                                             "Model: tiny",
                                             &gp, &info),
                SDE_OK, NULL, "infotext_read");
  expect(gp.steps == 3 && gp.seed == 21 && gp.sampler == SDE_SAMPLER_EULER_A && gp.schedule == SDE_SCHEDULE_KARRAS &&
             gp.conventions == SDE_CONVENTIONS_A1111 && gp.rng == SDE_RNG_NV && gp.subseed == 5 &&
             gp.eta_noise_seed_delta == 31337 && gp.prompt_syntax == SDE_PROMPT_SYNTAX_A1111 && gp.width == 16 &&
             gp.clip_skip == 1,
         "infotext_fields", "the request differs from the text");
  const char *model_name = sde_infotext_field(info, "Model");
  expect(model_name && !strcmp(model_name, "tiny"), "infotext_descriptive_field", "Model: tiny not kept");
  sde_image *images = NULL;
  int count = 0;
  expect_status(sde_model_generate(model, &gp, &images, &count), SDE_OK, NULL, "infotext_generate");
  sde_images_free(images, count);
  sde_infotext_free(info);
  info = NULL;
  sde_gen_params_init(&gp);
  expect_status(sde_gen_params_from_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, Hires upscale: 2", &gp, &info),
                SDE_ERR_INVALID_ARGUMENT, "Hires upscale", "infotext_unknown_field");
  expect(info == NULL && gp.steps != 4, "infotext_error_changes_nothing", "an error left a request or info behind");

  /* Explicit initial noise (latents_in; the tiny model: 4 latent channels, VAE downscale 2): a
   * deterministic sampler then gives the same image whatever the seed. */
  float latents[4 * 8 * 8];
  for (int i = 0; i < 4 * 8 * 8; ++i) latents[i] = (float)((i * 37 % 17) - 8) / 5.0f;
  unsigned char *with[2] = {NULL, NULL};
  for (int k = 0; k < 2; ++k) {
    small_request(&gp, 100 + (uint64_t)k);
    gp.sampler = SDE_SAMPLER_EULER;
    gp.latents_in = latents;
    sde_status st = sde_model_generate(model, &gp, &images, &count);
    expect(st == SDE_OK, "latents_in_generate", sde_last_error());
    if (st == SDE_OK) {
      with[k] = malloc(bytes);
      memcpy(with[k], images[0].data, bytes);
      sde_images_free(images, count);
    }
  }
  small_request(&gp, 100);
  gp.sampler = SDE_SAMPLER_EULER;
  unsigned char *drawn = NULL;
  if (sde_model_generate(model, &gp, &images, &count) == SDE_OK) {
    drawn = malloc(bytes);
    memcpy(drawn, images[0].data, bytes);
    sde_images_free(images, count);
  }
  expect(with[0] && with[1] && drawn && !memcmp(with[0], with[1], bytes) && memcmp(with[0], drawn, bytes),
         "latents_in_used", "latents_in did not set the start (same image across seeds, unlike the seed's own)");
  free(with[0]);
  free(with[1]);
  free(drawn);
  sde_model_free(model);
  return failures;
}

/* ---- memory ---- */

static long rss_kib(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long pages = 0, resident = 0;
  if (!f) return -1;
  if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
  fclose(f);
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int test_rss(const char *model_dir, const char *engine_dir, int total, double max_growth) {
  sde_model *model = load(model_dir, engine_dir, 1);
  int warmup = total / 10 > 5 ? total / 10 : 5;
  long after_warmup = 0, peak = 0;
  for (int i = 0; i < total; ++i) {
    sde_status s;
    unsigned char *r = run_job(model, i, &s);
    if (!r) {
      printf("FAIL rss job %d: %s\n", i, sde_last_error());
      return 1;
    }
    free(r);
    long now = rss_kib();
    if (i + 1 == warmup) after_warmup = now;
    if (i + 1 > warmup && now > peak) peak = now;
  }
  char why[256];
  double growth = after_warmup > 0 ? (double)(peak - after_warmup) / after_warmup : 1.0;
  snprintf(why, sizeof why, "RSS %ld KiB after %d warm-up generations, peak %ld KiB over %d more (%.2f%%)", after_warmup,
           warmup, peak, total - warmup, 100.0 * growth);
  printf("rss: %s\n", why);
  expect(growth <= max_growth, "rss_stable", why);
  sde_model_free(model);
  return failures;
}

/* ---- soak: many threads, some requests cancelled ---- */

#define SOAK_CONFIGS 48 /* distinct requests; request k is config k % SOAK_CONFIGS */
#define SOAK_STEPS 3

typedef struct {
  sde_model *model;
  int first, count, cancel_percent;
  unsigned seed;
  unsigned char **twins;
  int equal, differ, cancelled, cancel_wrong, failed;
} soak_arg;

typedef struct {
  int cancel_at; /* 0: never */
  int last_step;
} soak_cancel;

static int soak_progress(void *user, int step, int steps) {
  soak_cancel *c = (soak_cancel *)user;
  (void)steps;
  c->last_step = step;
  return c->cancel_at && step >= c->cancel_at;
}

static void soak_request(sde_gen_params *gp, int config) {
  small_request(gp, 5000 + (uint64_t)config);
  gp->steps = SOAK_STEPS;
  sde_sampler_from_str(job_sampler(config), &gp->sampler, &gp->schedule);
}

static void *soak_worker(void *p) {
  soak_arg *w = (soak_arg *)p;
  size_t bytes = 16 * 16 * 3;
  for (int i = 0; i < w->count; ++i) {
    int config = (w->first + i) % SOAK_CONFIGS;
    soak_cancel cancel = {0, 0};
    if ((int)(rand_r(&w->seed) % 100) < w->cancel_percent) cancel.cancel_at = 1 + (int)(rand_r(&w->seed) % SOAK_STEPS);
    sde_gen_params gp;
    soak_request(&gp, config);
    gp.progress = soak_progress;
    gp.progress_user = &cancel;
    sde_image *images = NULL;
    int count = 0;
    sde_status s = sde_model_generate(w->model, &gp, &images, &count);
    if (cancel.cancel_at) {
      w->cancelled++;
      if (s != SDE_ERR_CANCELLED || images || count || cancel.last_step != cancel.cancel_at) w->cancel_wrong++;
    } else if (s != SDE_OK) {
      w->failed++;
    } else if (count == 1 && !memcmp(images[0].data, w->twins[config], bytes)) {
      w->equal++;
    } else {
      w->differ++;
    }
    sde_images_free(images, count);
  }
  return NULL;
}

static int test_soak(const char *model_dir, const char *engine_dir, int threads, int requests, int cancel_percent) {
  sde_model *model = load(model_dir, engine_dir, threads);
  size_t bytes = 16 * 16 * 3;
  unsigned char *twins[SOAK_CONFIGS];
  for (int c = 0; c < SOAK_CONFIGS; ++c) { /* the serial twins */
    sde_gen_params gp;
    soak_request(&gp, c);
    sde_image *images = NULL;
    int count = 0;
    if (sde_model_generate(model, &gp, &images, &count) != SDE_OK) {
      printf("FAIL soak serial %d: %s\n", c, sde_last_error());
      return 1;
    }
    twins[c] = malloc(bytes);
    memcpy(twins[c], images[0].data, bytes);
    sde_images_free(images, count);
  }
  soak_arg *args = calloc((size_t)threads, sizeof *args);
  pthread_t *ids = calloc((size_t)threads, sizeof *ids);
  for (int t = 0; t < threads; ++t) {
    args[t] = (soak_arg){model, t * requests, requests, cancel_percent, 1234u + (unsigned)t, twins, 0, 0, 0, 0, 0};
    pthread_create(&ids[t], NULL, soak_worker, &args[t]);
  }
  int equal = 0, differ = 0, cancelled = 0, cancel_wrong = 0, failed = 0;
  for (int t = 0; t < threads; ++t) {
    pthread_join(ids[t], NULL);
    equal += args[t].equal;
    differ += args[t].differ;
    cancelled += args[t].cancelled;
    cancel_wrong += args[t].cancel_wrong;
    failed += args[t].failed;
  }
  /* the model still serves: one more request equals its twin */
  sde_gen_params gp;
  soak_request(&gp, 7);
  sde_image *images = NULL;
  int count = 0;
  int after = sde_model_generate(model, &gp, &images, &count) == SDE_OK && count == 1 && !memcmp(images[0].data, twins[7], bytes);
  sde_images_free(images, count);
  char why[512];
  snprintf(why, sizeof why,
           "%d threads x %d requests: %d cancelled (%d not cleanly: wrong status, images or step), %d uncancelled "
           "equal to their serial twins, %d differ, %d failed; model usable afterwards: %s",
           threads, requests, cancelled, cancel_wrong, equal, differ, failed, after ? "yes" : "no");
  printf("soak: %s\n", why);
  expect(cancel_wrong == 0 && differ == 0 && failed == 0 && after && cancelled > 0 &&
             equal + cancelled == threads * requests,
         "soak_threads_cancel", why);
  for (int c = 0; c < SOAK_CONFIGS; ++c) free(twins[c]);
  free(args);
  free(ids);
  sde_model_free(model);
  return failures;
}

/* ---- out of memory ---- */

static long vm_bytes(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long pages = 0;
  if (!f) return -1;
  if (fscanf(f, "%ld", &pages) != 1) pages = -1;
  fclose(f);
  return pages * sysconf(_SC_PAGESIZE);
}

static int test_oom(const char *model_dir, const char *engine_dir) {
  sde_model *model = load(model_dir, engine_dir, 1);
  sde_gen_params gp;
  small_request(&gp, 3);
  sde_image *images = NULL;
  int count = 0;
  if (sde_model_generate(model, &gp, &images, &count) != SDE_OK) {
    printf("FAIL oom first request: %s\n", sde_last_error());
    return 1;
  }
  size_t bytes = 16 * 16 * 3;
  unsigned char *before = malloc(bytes);
  memcpy(before, images[0].data, bytes);
  sde_images_free(images, count);
  /* 512 MiB of address space left: a 1024 x 1024, batch 16 request needs several GiB */
  struct rlimit limit;
  getrlimit(RLIMIT_AS, &limit);
  limit.rlim_cur = (rlim_t)vm_bytes() + ((rlim_t)512 << 20);
  if (setrlimit(RLIMIT_AS, &limit) != 0) {
    printf("FAIL oom: setrlimit\n");
    return 1;
  }
  sde_gen_params big = gp;
  big.width = big.height = 1024;
  big.batch_size = 16;
  big.steps = 1;
  big.sampler = SDE_SAMPLER_EULER;
  sde_status s = sde_model_generate(model, &big, &images, &count);
  expect_status(s, SDE_ERR_OUT_OF_MEMORY, "out of memory generating 16 image(s) of 1024x1024 (batch_size 16)",
                "oom_status_and_message");
  expect(images == NULL && count == 0, "oom_outputs_cleared", "images/count set on failure");
  s = sde_model_generate(model, &gp, &images, &count); /* still under the limit: what the big one took is freed */
  expect_status(s, SDE_OK, NULL, "oom_next_request_succeeds");
  if (s == SDE_OK) {
    expect(count == 1 && !memcmp(images[0].data, before, bytes), "oom_next_request_same_image", "the image changed");
    sde_images_free(images, count);
  }
  free(before);
  sde_model_free(model);
  return failures;
}

/* ---- ControlNets ---- */

static unsigned char *read_bytes(const char *path, size_t size) {
  FILE *f = fopen(path, "rb");
  unsigned char *data = malloc(size);
  if (!f || !data || fread(data, 1, size, f) != size) {
    printf("FAIL read %s\n", path);
    exit(100);
  }
  fclose(f);
  return data;
}

static sde_controlnet *load_controlnet(const char *path, const sde_model *model, const char *engine_dir,
                                       sde_status *status) {
  sde_controlnet_params cp;
  sde_controlnet_params_init(&cp);
  cp.model = model;
  cp.engine_dir = engine_dir;
  sde_controlnet *cn = NULL;
  *status = sde_controlnet_load(path, &cp, &cn);
  return cn;
}

/* Two ControlNets (CN0: scale 0.7 over [0.25, 0.75]; CN1: scale 1.1 in guess mode), 4 euler steps,
 * guidance 5, seed 3, W x H: the image goes to OUT for the Python test to compare with the eager
 * pipeline. Then bad input, each refused with its parameter named: a ControlNet that does not fit
 * the model (MISFIT, another family), NULL image, NaN scale, start > end, too many controls, and a
 * ControlNet loaded for another model. */
static int test_controlnet(char **argv) {
  const char *model_dir = argv[2], *engine_dir = argv[3], *cn_paths[2] = {argv[4], argv[5]}, *cn_engine = argv[6];
  const char *image_paths[2] = {argv[7], argv[8]}, *misfit = argv[12];
  int width = atoi(argv[9]), height = atoi(argv[10]);
  sde_model *model = load(model_dir, engine_dir, 2);
  sde_status status;
  sde_controlnet *cns[2];
  unsigned char *images[2];
  for (int i = 0; i < 2; ++i) {
    cns[i] = load_controlnet(cn_paths[i], model, cn_engine, &status);
    expect_status(status, SDE_OK, NULL, "controlnet load");
    images[i] = read_bytes(image_paths[i], (size_t)width * height * 3);
  }
  sde_control controls[2];
  for (int i = 0; i < 2; ++i) {
    sde_control_init(&controls[i]);
    controls[i].controlnet = cns[i];
    controls[i].image = images[i];
  }
  controls[0].scale = 0.7;
  controls[0].start = 0.25;
  controls[0].end = 0.75;
  controls[1].scale = 1.1;
  controls[1].guess_mode = 1;
  sde_gen_params gp;
  sde_gen_params_init(&gp);
  gp.prompt = "a red bicycle";
  gp.width = width;
  gp.height = height;
  gp.steps = 4;
  gp.guidance_scale = 5.0;
  gp.seed = 3;
  gp.sampler = SDE_SAMPLER_EULER;
  gp.controls = controls;
  gp.control_count = 2;
  sde_image *out = NULL;
  int count = 0;
  status = sde_model_generate(model, &gp, &out, &count);
  expect_status(status, SDE_OK, NULL, "controlnet generate");
  if (status == SDE_OK && count == 1) {
    FILE *f = fopen(argv[11], "wb");
    fwrite(out[0].data, 1, (size_t)width * height * 3, f);
    fclose(f);
  }
  sde_images_free(out, count);

  sde_controlnet *bad = load_controlnet(misfit, model, NULL, &status);
  expect_status(status, SDE_ERR_FORMAT, "does not fit", "controlnet of another family");
  expect(bad == NULL, "controlnet of another family: no handle", "a handle was returned");
  struct {
    const char *name, *needle;
    int field;
  } cases[] = {{"control image NULL", "controls[1].image is NULL", 0},
               {"control scale NaN", "controls[1].scale must be a finite number", 1},
               {"control start after end", "controls[1].start (0.8) must not be after end (0.2)", 2},
               {"control end above 1", "controls[1].end must be in [0, 1]", 3}};
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; ++k) {
    sde_control broken[2] = {controls[0], controls[1]};
    if (cases[k].field == 0) broken[1].image = NULL;
    if (cases[k].field == 1) broken[1].scale = NAN;
    if (cases[k].field == 2) broken[1].start = 0.8, broken[1].end = 0.2;
    if (cases[k].field == 3) broken[1].end = 1.5;
    gp.controls = broken;
    expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT, cases[k].needle, cases[k].name);
  }
  gp.controls = controls;
  gp.control_count = 9;
  expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT, "control_count must be",
                "too many controls");
  sde_model *other = load(model_dir, engine_dir, 1);
  sde_controlnet *foreign = load_controlnet(cn_paths[0], other, cn_engine, &status);
  expect_status(status, SDE_OK, NULL, "controlnet for a second model");
  sde_control wrong = controls[0];
  wrong.controlnet = foreign;
  gp.controls = &wrong;
  gp.control_count = 1;
  expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT, "loaded for another model",
                "controlnet of another model");
  sde_controlnet_free(foreign);
  sde_model_free(other);
  for (int i = 0; i < 2; ++i) {
    sde_controlnet_free(cns[i]);
    free(images[i]);
  }
  sde_model_free(model);
  return failures;
}

/* DeepCache: the engine found by folder and in the cache, one of another branch refused, the
 * request's rules, a run equal to itself and to 4 threads at once, and the image written to
 * OUT for the Python side to compare with the eager pipeline's.
 * args: deepcache MODEL ENGINE DEEPCACHE_ENGINE OUT */
typedef struct {
  sde_model *model;
  const sde_gen_params *gp;
  unsigned char *image;
} deep_job;

static void *deep_worker(void *arg) {
  deep_job *job = arg;
  job->image = small_image(job->model, job->gp, "deepcache thread");
  return NULL;
}

static int test_deepcache(char **argv) {
  const char *model_dir = argv[2], *engine_dir = argv[3], *dc_engine = argv[4];
  sde_model *model = load(model_dir, engine_dir, 4);
  sde_deepcache_params dp;
  sde_deepcache_params_init(&dp);
  expect(dp.branch == 0 && dp.engine_dir == NULL, "deepcache params defaults", "branch 0, no folder");
  sde_deepcache *dc = NULL, *found = NULL, *bad = NULL;
  expect_status(sde_deepcache_load(&dp, &dc), SDE_ERR_INVALID_ARGUMENT, "params->model is NULL", "deepcache no model");
  dp.model = model;
  dp.engine_dir = dc_engine;
  expect_status(sde_deepcache_load(&dp, &dc), SDE_OK, NULL, "deepcache load");
  dp.engine_dir = NULL;
  expect_status(sde_deepcache_load(&dp, &found), SDE_OK, NULL, "deepcache found in the cache");
  dp.engine_dir = dc_engine;
  dp.branch = 1;
  expect_status(sde_deepcache_load(&dp, &bad), SDE_ERR_FORMAT, "it is for branch 0", "deepcache of another branch");
  expect(bad == NULL, "deepcache of another branch: no handle", "a handle was returned");
  dp.branch = -1;
  expect_status(sde_deepcache_load(&dp, &bad), SDE_ERR_INVALID_ARGUMENT, "branch must be an integer >= 0",
                "deepcache branch -1");

  sde_gen_params gp;
  small_request(&gp, 11);
  gp.steps = 4;
  gp.sampler = SDE_SAMPLER_EULER;
  unsigned char *plain = small_image(model, &gp, "deepcache off");
  gp.deepcache = dc;
  gp.deepcache_interval = 2;
  unsigned char *cached = small_image(model, &gp, "deepcache on");
  gp.deepcache = found;
  unsigned char *again = small_image(model, &gp, "deepcache on, the engine from the cache");
  if (plain && cached && again) {
    expect(memcmp(plain, cached, 16 * 16 * 3) != 0, "deepcache changes the image", "the same image as without it");
    expect(memcmp(cached, again, 16 * 16 * 3) == 0, "deepcache repeats", "two runs differ");
    FILE *f = fopen(argv[5], "wb");
    fwrite(cached, 1, 16 * 16 * 3, f);
    fclose(f);
  }
  /* 4 threads at once on one model, each the serial image */
  pthread_t threads[4];
  deep_job jobs[4];
  for (int i = 0; i < 4; ++i) {
    jobs[i].model = model, jobs[i].gp = &gp, jobs[i].image = NULL;
    pthread_create(&threads[i], NULL, deep_worker, &jobs[i]);
  }
  for (int i = 0; i < 4; ++i) {
    pthread_join(threads[i], NULL);
    expect(jobs[i].image && cached && memcmp(jobs[i].image, cached, 16 * 16 * 3) == 0, "deepcache threads",
           "a thread's image differs from the serial one");
    free(jobs[i].image);
  }
  sde_image *out = NULL;
  int count = 0;
  gp.deepcache_branch = 2;
  expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT,
                "deepcache_branch is 2 but deepcache was loaded for branch 0", "deepcache branch mismatch");
  gp.deepcache_branch = -1;
  gp.deepcache = NULL;
  expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT,
                "deepcache_interval 2 needs deepcache", "deepcache interval without engine");
  gp.deepcache = dc;
  gp.deepcache_interval = 0;
  expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT,
                "deepcache is set but deepcache_interval is 0", "deepcache engine without interval");
  gp.deepcache_interval = 1001;
  expect_status(sde_model_generate(model, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT,
                "deepcache_interval must be an integer in [0, 1000]", "deepcache interval too large");
  sde_model *other = load(model_dir, engine_dir, 1);
  gp.deepcache_interval = 2;
  expect_status(sde_model_generate(other, &gp, &out, &count), SDE_ERR_INVALID_ARGUMENT,
                "deepcache was loaded for another model", "deepcache of another model");
  /* an infotext's DeepCache fields */
  sde_gen_params from;
  sde_infotext *info = NULL;
  sde_gen_params_init(&from);
  expect_status(sde_gen_params_from_infotext("a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 16x16, "
                                             "DeepCache interval: 3, DeepCache branch: 1",
                                             &from, &info),
                SDE_OK, NULL, "deepcache infotext");
  expect(from.deepcache_interval == 3 && from.deepcache_branch == 1 && from.deepcache == NULL, "deepcache infotext fields",
         "interval 3, branch 1, no engine");
  sde_infotext_free(info);
  sde_model_free(other);
  sde_deepcache_free(found);
  sde_deepcache_free(dc);
  sde_deepcache_free(NULL);
  free(plain);
  free(cached);
  free(again);
  sde_model_free(model);
  return failures;
}

int main(int argc, char **argv) {
  if (argc >= 6 && !strcmp(argv[1], "deepcache")) return test_deepcache(argv);
  if (argc >= 13 && !strcmp(argv[1], "controlnet")) return test_controlnet(argv);
  if (argc >= 5 && !strcmp(argv[1], "args")) return test_args(argv[2], argv[3], argv[4]);
  if (argc >= 6 && !strcmp(argv[1], "threads")) return test_threads(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
  if (argc >= 5 && !strcmp(argv[1], "rss"))
    return test_rss(argv[2], argv[3], atoi(argv[4]), argc >= 6 ? atof(argv[5]) / 100.0 : 0.02);
  if (argc >= 7 && !strcmp(argv[1], "soak"))
    return test_soak(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
  if (argc >= 4 && !strcmp(argv[1], "oom")) return test_oom(argv[2], argv[3]);
  if (argc >= 5 && !strcmp(argv[1], "samplers")) return test_samplers(argv[2], argv[3], atoi(argv[4]));
  fprintf(stderr, "usage: %s args|threads|rss|soak|oom|controlnet MODEL_DIR ENGINE_DIR ...\n", argv[0]);
  return 2;
}
