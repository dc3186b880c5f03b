/* Embedding sdengine from C: load a model, generate one image, write it as a PPM file.
 * It links only libsdengine and includes only sdengine.h.
 *
 *   sde_generate MODEL OUT.ppm [-p PROMPT] [-n NEGATIVE] [-e ENGINE_DIR] [-s SAMPLER]
 *                [-t STEPS] [-g GUIDANCE] [-S SEED] [-W WIDTH] [-H HEIGHT]
 *
 * MODEL is a diffusers folder or a single-file (A1111 / Civitai) .safetensors checkpoint.
 * SAMPLER takes sdengine, A1111 or ComfyUI names ("euler_a", "DPM++ 2M Karras").
 * Without -e the engine comes from the cache (`sdengine export aoti MODEL` builds it).
 */
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

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL OUT.ppm [-p PROMPT] [-n NEGATIVE] [-e ENGINE_DIR] [-s SAMPLER] "
                    "[-t STEPS] [-g GUIDANCE] [-S SEED] [-W WIDTH] [-H HEIGHT]\n", argv[0]);
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

  sde_model *model = NULL;
  sde_status status = sde_model_load(model_dir, &mp, &model);
  if (status != SDE_OK) {
    fprintf(stderr, "load failed (%s): %s\n", sde_status_str(status), sde_last_error());
    return 1;
  }
  sde_image *images = NULL;
  int count = 0;
  status = sde_generate(model, &gp, &images, &count);
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
  return rc ? 1 : 0;
}
