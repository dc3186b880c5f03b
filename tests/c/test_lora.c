/* LoRA and textual inversion through the C API (sde_model_set_loras, sde_model_load_embedding),
 * as an embedding app would use them: sdengine.h and libsdengine only.
 *
 *   test_lora images  MODEL ENGINE LORA_A LORA_B EMBEDDING OUT   images for Python to compare
 *   test_lora threads MODEL ENGINE LORA_A LORA_B THREADS SWAPS   requests while a thread swaps
 *
 * images: writes OUT/{base,a,ab,emb}.rgb (16x16 RGB), checks that count 0 gives the base image
 * back byte for byte and that bad input (a missing file, a token that exists, NULL arguments)
 * is an error that changes nothing.
 * threads: THREADS threads generate while one more merges SWAPS sets in turn ({}, {A 0.8},
 * {B 1.0}); every image must equal, byte for byte, the serial image of a set that was merged
 * while its request could have started (no request ever sees half a set).
 * Prints one line per check; exit status 0 when all pass. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdengine.h"

#define SIZE 16
#define BYTES (SIZE * SIZE * 3)
#define PROMPT "a photograph of an astronaut riding a horse"

static int failures = 0;

#define CHECK(cond, ...)                      \
  do {                                        \
    if (cond) {                               \
      printf("ok   ");                        \
    } else {                                  \
      printf("FAIL ");                        \
      ++failures;                             \
    }                                         \
    printf(__VA_ARGS__);                      \
    printf("\n");                             \
    fflush(stdout);                           \
  } while (0)

static sde_model *load(const char *model_dir, const char *engine_dir) {
  sde_model_params mp;
  sde_model_params_init(&mp);
  mp.engine_dir = engine_dir;
  mp.max_concurrency = 4;
  sde_model *model = NULL;
  if (sde_model_load(model_dir, &mp, &model) != SDE_OK) {
    fprintf(stderr, "load: %s\n", sde_last_error());
    exit(2);
  }
  return model;
}

/* One 16x16 image of prompt into out (BYTES); returns the status. */
static sde_status generate(sde_model *model, const char *prompt, uint8_t *out) {
  sde_gen_params gp;
  sde_gen_params_init(&gp);
  gp.prompt = prompt;
  gp.width = gp.height = SIZE;
  gp.steps = 3;
  gp.seed = 3;
  gp.sampler = SDE_SAMPLER_EULER;
  sde_image *images = NULL;
  int count = 0;
  sde_status status = sde_model_generate(model, &gp, &images, &count);
  if (status == SDE_OK) {
    memcpy(out, images[0].data, BYTES);
    sde_images_free(images, count);
  }
  return status;
}

static void write_image(const char *dir, const char *name, const uint8_t *data) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.rgb", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f || fwrite(data, 1, BYTES, f) != BYTES) {
    fprintf(stderr, "cannot write %s\n", path);
    exit(2);
  }
  fclose(f);
}

static int images(int argc, char **argv) {
  if (argc != 8) return 2;
  const char *lora_a = argv[4], *lora_b = argv[5], *embedding = argv[6], *out = argv[7];
  sde_model *model = load(argv[2], argv[3]);
  uint8_t base[BYTES], image[BYTES];
  CHECK(generate(model, PROMPT, base) == SDE_OK, "base image");
  write_image(out, "base", base);

  sde_lora a[] = {{lora_a, 0.8f}};
  CHECK(sde_model_set_loras(model, a, 1) == SDE_OK, "set_loras A 0.8: %s", sde_last_error());
  CHECK(generate(model, PROMPT, image) == SDE_OK, "image with A");
  write_image(out, "a", image);
  CHECK(memcmp(image, base, BYTES) != 0, "A changes the image");

  sde_lora ab[] = {{lora_a, 0.7f}, {lora_b, 0.4f}};
  CHECK(sde_model_set_loras(model, ab, 2) == SDE_OK, "set_loras A 0.7 + B 0.4: %s", sde_last_error());
  CHECK(generate(model, PROMPT, image) == SDE_OK, "image with A + B");
  write_image(out, "ab", image);

  uint8_t before[BYTES];
  memcpy(before, image, BYTES);
  sde_lora bad[] = {{lora_a, 0.5f}, {"/no/such/lora.safetensors", 1.0f}};
  sde_status status = sde_model_set_loras(model, bad, 2);
  CHECK(status == SDE_ERR_IO && strstr(sde_last_error(), "/no/such/lora.safetensors"),
        "a missing file is SDE_ERR_IO naming it (%d: %s)", status, sde_last_error());
  sde_lora not_lora[] = {{embedding, 1.0f}};
  status = sde_model_set_loras(model, not_lora, 1);
  CHECK(status == SDE_ERR_FORMAT && strstr(sde_last_error(), embedding),
        "a file that is no LoRA is SDE_ERR_FORMAT naming it (%s)", sde_last_error());
  CHECK(generate(model, PROMPT, image) == SDE_OK && memcmp(image, before, BYTES) == 0,
        "after the failed swaps the set A + B is still merged, unchanged");
  CHECK(sde_model_set_loras(model, NULL, 1) == SDE_ERR_INVALID_ARGUMENT, "NULL loras with a count");
  CHECK(sde_model_set_loras(NULL, NULL, 0) == SDE_ERR_INVALID_ARGUMENT, "NULL model");

  CHECK(sde_model_set_loras(model, NULL, 0) == SDE_OK, "set_loras {}: %s", sde_last_error());
  CHECK(generate(model, PROMPT, image) == SDE_OK && memcmp(image, base, BYTES) == 0,
        "count 0 gives the base image back, byte for byte");

  CHECK(sde_model_load_embedding(model, embedding, "<tinycat>") == SDE_OK, "load_embedding: %s", sde_last_error());
  CHECK(generate(model, "a photo of <tinycat>", image) == SDE_OK, "image with the embedding's token");
  write_image(out, "emb", image);
  status = sde_model_load_embedding(model, embedding, "<TinyCat>");
  CHECK(status == SDE_ERR_INVALID_ARGUMENT && strstr(sde_last_error(), "already exists"),
        "a token that exists is an error (%s)", sde_last_error());
  status = sde_model_load_embedding(model, embedding, "photo");
  CHECK(status == SDE_ERR_INVALID_ARGUMENT, "a vocabulary word as token is an error (%s)", sde_last_error());
  status = sde_model_load_embedding(model, lora_a, "<x>");
  CHECK(status == SDE_ERR_FORMAT, "a LoRA file as an embedding is SDE_ERR_FORMAT (%s)", sde_last_error());
  uint8_t again[BYTES];
  CHECK(generate(model, "a photo of <tinycat>", again) == SDE_OK && memcmp(image, again, BYTES) == 0,
        "the failed loads changed nothing");
  sde_model_free(model);
  return failures ? 1 : 0;
}

/* ---- threads ---- */

#define MAX_SWAPS 256
static sde_model *shared_model;
static uint8_t serial[3][BYTES];
static int schedule[MAX_SWAPS + 2];  /* the set merged by swap k (0: the set at the start) */
static atomic_int swaps_done;
static atomic_int swapping;
static atomic_int requests, mismatches;
static sde_lora sets[3][1];
static int set_sizes[3] = {0, 1, 1};

static void *generator_thread(void *arg) {
  (void)arg;
  uint8_t image[BYTES];
  int own = 0;
  while (atomic_load(&swapping) || own < 2) {
    int first = atomic_load(&swaps_done);
    if (generate(shared_model, PROMPT, image) != SDE_OK) {
      fprintf(stderr, "generate: %s\n", sde_last_error());
      atomic_fetch_add(&mismatches, 1);
      break;
    }
    int last = atomic_load(&swaps_done) + 1;  /* a swap may have returned without being counted yet */
    int matched = 0;
    for (int k = first; k <= last && !matched; ++k) matched = memcmp(image, serial[schedule[k]], BYTES) == 0;
    if (!matched) atomic_fetch_add(&mismatches, 1);
    atomic_fetch_add(&requests, 1);
    ++own;
  }
  return NULL;
}

static int threads(int argc, char **argv) {
  if (argc != 8) return 2;
  int n_threads = atoi(argv[6]), n_swaps = atoi(argv[7]);
  if (n_threads < 1 || n_swaps < 1 || n_swaps > MAX_SWAPS) return 2;
  shared_model = load(argv[2], argv[3]);
  sets[1][0] = (sde_lora){argv[4], 0.8f};
  sets[2][0] = (sde_lora){argv[5], 1.0f};
  for (int s = 2; s >= 0; --s) {  /* ends with the empty set merged */
    if (sde_model_set_loras(shared_model, sets[s], set_sizes[s]) != SDE_OK || generate(shared_model, PROMPT, serial[s]) != SDE_OK) {
      fprintf(stderr, "serial image %d: %s\n", s, sde_last_error());
      return 2;
    }
  }
  CHECK(memcmp(serial[0], serial[1], BYTES) && memcmp(serial[1], serial[2], BYTES) && memcmp(serial[0], serial[2], BYTES),
        "the three sets give three different images");
  for (int k = 0; k < MAX_SWAPS + 2; ++k) schedule[k] = (k <= n_swaps ? k : n_swaps) % 3;
  atomic_store(&swapping, 1);
  pthread_t workers[64];
  if (n_threads > 64) n_threads = 64;
  for (int i = 0; i < n_threads; ++i) pthread_create(&workers[i], NULL, generator_thread, NULL);
  int swap_errors = 0;
  for (int k = 1; k <= n_swaps; ++k) {
    int s = schedule[k];
    if (sde_model_set_loras(shared_model, sets[s], set_sizes[s]) != SDE_OK) {
      fprintf(stderr, "swap %d: %s\n", k, sde_last_error());
      ++swap_errors;
    }
    atomic_fetch_add(&swaps_done, 1);
  }
  atomic_store(&swapping, 0);
  for (int i = 0; i < n_threads; ++i) pthread_join(workers[i], NULL);
  CHECK(swap_errors == 0, "%d swaps while %d threads generated", n_swaps, n_threads);
  CHECK(atomic_load(&mismatches) == 0, "%d requests, each the serial image of a set merged when it ran (%d did not)",
        atomic_load(&requests), atomic_load(&mismatches));
  sde_model_free(shared_model);
  return failures ? 1 : 0;
}

int main(int argc, char **argv) {
  int rc = 2;
  if (argc >= 2 && strcmp(argv[1], "images") == 0) rc = images(argc, argv);
  else if (argc >= 2 && strcmp(argv[1], "threads") == 0) rc = threads(argc, argv);
  if (rc == 2) fprintf(stderr, "usage: test_lora images MODEL ENGINE LORA_A LORA_B EMBEDDING OUT | threads MODEL ENGINE LORA_A LORA_B THREADS SWAPS\n");
  return rc;
}
