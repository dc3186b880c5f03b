/* Redrawing an image from its PNG: read the `parameters` text that AUTOMATIC1111 (and sdengine)
 * write into a PNG, turn it into a request with sde_gen_params_from_infotext, generate, and
 * write the result as a PNG carrying the same text. No Python; it links only libsdengine and
 * includes only sdengine.h (the PNG is read and written here: chunks, CRC-32, stored deflate).
 *
 *   sde_redraw MODEL IN.png OUT.png [-e ENGINE_DIR] [-d DEEPCACHE_ENGINE_DIR]
 *
 * MODEL is a diffusers folder or a single-file (A1111 / Civitai) .safetensors checkpoint: the
 * checkpoint the image was drawn with ("Model" in the text says which). The text's fields that
 * would draw another image and that the runtime cannot honour are an error naming them. A text
 * with "DeepCache interval" (sdengine's DeepCache) needs the DeepCache engine of its branch: -d,
 * or found in the engine cache.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdengine.h"

/* ---- PNG: chunks, CRC-32 and zlib's stored blocks ---- */

static uint32_t crc32_update(uint32_t crc, const uint8_t *data, size_t n) {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= data[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

static void put32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

/* The text of the PNG's "parameters" chunk (tEXt, or an uncompressed iTXt), malloc'd; NULL when absent. */
static char *read_parameters(const char *path, char *why, size_t why_size) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(why, why_size, "cannot open %s", path);
    return NULL;
  }
  uint8_t sig[8], head[8];
  static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  char *text = NULL;
  snprintf(why, why_size, "%s has no 'parameters' text chunk", path);
  if (fread(sig, 1, 8, f) != 8 || memcmp(sig, png_sig, 8) != 0) {
    snprintf(why, why_size, "%s is not a PNG", path);
    fclose(f);
    return NULL;
  }
  while (!text && fread(head, 1, 8, f) == 8) {
    uint32_t length = be32(head);
    if (length > (1u << 30)) break;
    uint8_t *data = malloc((size_t)length + 4);
    if (!data || fread(data, 1, (size_t)length + 4, f) != (size_t)length + 4) {
      free(data);
      break;
    }
    int is_text = !memcmp(head + 4, "tEXt", 4), is_itxt = !memcmp(head + 4, "iTXt", 4);
    if ((is_text || is_itxt) && length >= 11 && !memcmp(data, "parameters", 11)) {
      size_t at = 11; /* keyword and its NUL */
      if (is_itxt) { /* compression flag, method, language tag NUL, translated keyword NUL */
        if (length < 13 || data[11] != 0) {
          snprintf(why, why_size, "%s: its 'parameters' chunk is compressed (zTXt / compressed iTXt)", path);
          free(data);
          break;
        }
        at = 13;
        for (int nul = 0; nul < 2 && at < length; ++at)
          if (data[at] == 0) ++nul;
      }
      text = malloc(length - at + 1);
      if (text) {
        memcpy(text, data + at, length - at);
        text[length - at] = '\0';
      }
    }
    int end = !memcmp(head + 4, "IEND", 4);
    free(data);
    if (end) break;
  }
  fclose(f);
  return text;
}

static int write_chunk(FILE *f, const char *type, const uint8_t *data, size_t n) {
  uint8_t head[8], tail[4];
  put32(head, (uint32_t)n);
  memcpy(head + 4, type, 4);
  uint32_t crc = crc32_update(crc32_update(0, (const uint8_t *)type, 4), data, n);
  put32(tail, crc);
  return fwrite(head, 1, 8, f) == 8 && (n == 0 || fwrite(data, 1, n, f) == n) && fwrite(tail, 1, 4, f) == 4;
}

/* An 8-bit RGB PNG whose IDAT is zlib's stored (uncompressed) blocks, with a tEXt chunk. */
static int write_png(const char *path, const sde_image *image, const char *parameters) {
  size_t row = (size_t)image->width * 3 + 1, raw_size = row * (size_t)image->height;
  uint8_t *raw = malloc(raw_size);
  size_t blocks = raw_size / 65535 + 1, z_size = 2 + raw_size + blocks * 5 + 4;
  uint8_t *z = malloc(z_size);
  if (!raw || !z) {
    free(raw), free(z);
    return -1;
  }
  for (int y = 0; y < image->height; ++y) { /* filter type 0 per row */
    raw[(size_t)y * row] = 0;
    memcpy(raw + (size_t)y * row + 1, image->data + (size_t)y * image->width * 3, (size_t)image->width * 3);
  }
  size_t at = 0, done = 0;
  z[at++] = 0x78, z[at++] = 0x01;
  uint32_t a = 1, b = 0; /* Adler-32 */
  for (size_t i = 0; i < raw_size; ++i) a = (a + raw[i]) % 65521, b = (b + a) % 65521;
  do {
    size_t n = raw_size - done > 65535 ? 65535 : raw_size - done;
    z[at++] = done + n == raw_size ? 1 : 0;
    z[at++] = (uint8_t)n, z[at++] = (uint8_t)(n >> 8), z[at++] = (uint8_t)~n, z[at++] = (uint8_t)(~n >> 8);
    memcpy(z + at, raw + done, n);
    at += n, done += n;
  } while (done < raw_size);
  put32(z + at, b << 16 | a);
  at += 4;
  FILE *f = fopen(path, "wb");
  int ok = f != NULL;
  if (f) {
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t ihdr[13] = {0};
    put32(ihdr, (uint32_t)image->width), put32(ihdr + 4, (uint32_t)image->height);
    ihdr[8] = 8, ihdr[9] = 2; /* 8 bits, RGB */
    size_t text_size = 11 + strlen(parameters);
    uint8_t *text = malloc(text_size);
    ok = text != NULL && fwrite(png_sig, 1, 8, f) == 8 && write_chunk(f, "IHDR", ihdr, 13);
    if (ok) {
      memcpy(text, "parameters", 11);
      memcpy(text + 11, parameters, strlen(parameters));
      ok = write_chunk(f, "tEXt", text, text_size) && write_chunk(f, "IDAT", z, at) && write_chunk(f, "IEND", NULL, 0);
    }
    free(text);
    ok = (fclose(f) == 0) && ok;
  }
  free(raw), free(z);
  return ok ? 0 : -1;
}

static int on_progress(void *user, int step, int steps) {
  (void)user;
  fprintf(stderr, "\rstep %d/%d", step, steps);
  if (step == steps) fprintf(stderr, "\n");
  return 0;
}

/* The infotext asks for DeepCache ("DeepCache interval"): load its branch's engine for the request. */
static sde_status load_deepcache(sde_model *model, sde_gen_params *gp, const char *engine_dir, sde_deepcache **out) {
  sde_deepcache_params dp;
  sde_deepcache_params_init(&dp);
  dp.model = model;
  dp.branch = gp->deepcache_branch;
  dp.engine_dir = engine_dir;
  sde_status status = sde_deepcache_load(&dp, out);
  gp->deepcache = *out;
  return status;
}

int main(int argc, char **argv) {
  if (argc < 4 || argc % 2) {
    fprintf(stderr, "usage: %s MODEL IN.png OUT.png [-e ENGINE_DIR] [-d DEEPCACHE_ENGINE_DIR]\n", argv[0]);
    return 2;
  }
  /* -e: the model's engine; -d: the DeepCache engine an infotext's "DeepCache interval" needs
   * (default for both: found in the engine cache) */
  const char *engine_dir = NULL, *deepcache_dir = NULL;
  for (int i = 4; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "-e")) {
      engine_dir = argv[i + 1];
    } else if (!strcmp(argv[i], "-d")) {
      deepcache_dir = argv[i + 1];
    } else {
      fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  char why[512];
  char *parameters = read_parameters(argv[2], why, sizeof why);
  if (!parameters) {
    fprintf(stderr, "%s\n", why);
    return 1;
  }
  sde_gen_params gp;
  sde_gen_params_init(&gp);
  sde_infotext *info = NULL;
  if (sde_gen_params_from_infotext(parameters, &gp, &info) != SDE_OK) {
    fprintf(stderr, "%s: %s\n", argv[2], sde_last_error());
    free(parameters);
    return 1;
  }
  const char *model_name = sde_infotext_field(info, "Model");
  fprintf(stderr, "%s: %s, %d steps, seed %llu%s%s\n", argv[2], sde_sampler_name(gp.sampler), gp.steps,
          (unsigned long long)gp.seed, model_name ? ", model " : "", model_name ? model_name : "");
  sde_model_params mp;
  sde_model_params_init(&mp);
  mp.engine_dir = engine_dir;
  sde_model *model = NULL;
  int rc = 1;
  if (sde_model_load(argv[1], &mp, &model) != SDE_OK) {
    fprintf(stderr, "%s\n", sde_last_error());
  } else {
    gp.progress = on_progress;
    sde_image *images = NULL;
    int count = 0;
    sde_deepcache *deepcache = NULL;
    if (gp.deepcache_interval > 0 && load_deepcache(model, &gp, deepcache_dir, &deepcache) != SDE_OK) {
      fprintf(stderr, "%s\n", sde_last_error());
    } else if (sde_model_generate(model, &gp, &images, &count) != SDE_OK) {
      fprintf(stderr, "%s\n", sde_last_error());
    } else {
      rc = write_png(argv[3], &images[0], parameters) == 0 ? 0 : 1;
      if (rc) fprintf(stderr, "cannot write %s\n", argv[3]);
      sde_images_free(images, count);
    }
    sde_deepcache_free(deepcache);
    sde_model_free(model);
  }
  sde_infotext_free(info);
  free(parameters);
  return rc;
}
