/* Embedding sdengine from C: load a model, generate one image, write it as a PPM file.
 * It links only libsdengine and includes only sdengine.h.
 *
 *   sde_generate MODEL OUT.ppm [-p PROMPT] [-n NEGATIVE] [-e ENGINE_DIR] [-s SAMPLER]
 *                [-t STEPS] [-g GUIDANCE] [-S SEED] [-W WIDTH] [-H HEIGHT] [-i INIT.ppm] [-r STRENGTH]
 *
 * MODEL is a diffusers folder or a single-file (A1111 / Civitai) .safetensors checkpoint.
 * SAMPLER takes sdengine, A1111 or ComfyUI names ("euler_a", "DPM++ 2M Karras").
 * -i starts from an image (img2img; its size is the output's), -r sets how much is redone.
 * Without -e the engine comes from the cache (`sdengine export aoti MODEL` builds it).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdengine.h"

static int on_progress(void *user, int step, int steps) {
  const char *name = (const char *)user;
  fprintf(stderr, "\r%s: step %d/%d", name, step, steps);
  if (step == steps) fprintf(stderr, "\n");
  return 0; /* nonzero would cancel */
}

static int write_ppm(const char *path, const sde_image *image) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  fprintf(f, "P6\n%d %d\n255\n", image->width, image->height);
  size_t bytes = (size_t)image->width * image->height * 3;
  int ok = fwrite(image->data, 1, bytes, f) == bytes;
  return (fclose(f) == 0 && ok) ? 0 : -1;
}

/* A binary PPM (P6, maxval 255); returns malloc'd RGB bytes or NULL. */
static uint8_t *read_ppm(const char *path, int *width, int *height) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  int maxval = 0;
  uint8_t *data = NULL;
  if (fscanf(f, "P6 %d %d %d", width, height, &maxval) == 3 && maxval == 255 && *width > 0 && *height > 0 &&
      fgetc(f) != EOF) {
    size_t bytes = (size_t)*width * *height * 3;
    data = malloc(bytes);
    if (data && fread(data, 1, bytes, f) != bytes) {
      free(data);
      data = NULL;
    }
  }
  fclose(f);
  return data;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL OUT.ppm [-p PROMPT] [-n NEGATIVE] [-e ENGINE_DIR] [-s SAMPLER] "
                    "[-t STEPS] [-g GUIDANCE] [-S SEED] [-W WIDTH] [-H HEIGHT] [-i INIT.ppm] [-r STRENGTH]\n", argv[0]);
    return 2;
  }
  const char *model_dir = argv[1], *out_path = argv[2];
  sde_model_params mp;
  sde_model_params_init(&mp);
  sde_gen_params gp;
  sde_gen_params_init(&gp);
  gp.prompt = "a photograph of an astronaut riding a horse";
  gp.progress = on_progress;
  gp.progress_user = (void *)"sdengine";
  uint8_t *init_image = NULL;
  int init_width = 0, init_height = 0;
  for (int i = 3; i + 1 < argc; i += 2) {
    const char *flag = argv[i], *value = argv[i + 1];
    if (!strcmp(flag, "-p")) gp.prompt = value;
    else if (!strcmp(flag, "-n")) gp.negative_prompt = value;
    else if (!strcmp(flag, "-e")) mp.engine_dir = value;
    else if (!strcmp(flag, "-t")) gp.steps = atoi(value);
    else if (!strcmp(flag, "-g")) gp.guidance_scale = atof(value);
    else if (!strcmp(flag, "-S")) gp.seed = strtoull(value, NULL, 10);
    else if (!strcmp(flag, "-W")) gp.width = atoi(value);
    else if (!strcmp(flag, "-H")) gp.height = atoi(value);
    else if (!strcmp(flag, "-r")) gp.strength = atof(value);
    else if (!strcmp(flag, "-i")) {
      free(init_image);
      init_image = read_ppm(value, &init_width, &init_height);
      if (!init_image) {
        fprintf(stderr, "cannot read %s as a binary PPM (P6, maxval 255)\n", value);
        return 2;
      }
      gp.init_image = init_image;
    }
    else if (!strcmp(flag, "-s")) {
      if (sde_sampler_from_str(value, &gp.sampler, &gp.schedule) != SDE_OK) {
        fprintf(stderr, "%s\n", sde_last_error());
        return 2;
      }
    } else {
      fprintf(stderr, "unknown option %s\n", flag);
      return 2;
    }
  }

  if (init_image) { /* the output has the init image's size */
    gp.width = init_width;
    gp.height = init_height;
  }

  sde_model *model = NULL;
  sde_status status = sde_model_load(model_dir, &mp, &model);
  if (status != SDE_OK) {
    fprintf(stderr, "load failed (%s): %s\n", sde_status_str(status), sde_last_error());
    return 1;
  }
  sde_image *images = NULL;
  int count = 0;
  status = sde_model_generate(model, &gp, &images, &count);
  if (status != SDE_OK) {
    fprintf(stderr, "generate failed (%s): %s\n", sde_status_str(status), sde_last_error());
    sde_model_free(model);
    return 1;
  }
  int rc = write_ppm(out_path, &images[0]);
  if (rc != 0) fprintf(stderr, "cannot write %s\n", out_path);
  else printf("%s: %dx%d, seed %llu\n", out_path, images[0].width, images[0].height, (unsigned long long)images[0].seed);
  sde_images_free(images, count);
  sde_model_free(model);
  free(init_image);
  return rc ? 1 : 0;
}
