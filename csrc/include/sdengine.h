/* sdengine C API. One public header; every call returns an sde_status. */
#ifndef SDENGINE_H
#define SDENGINE_H

#if defined(_WIN32)
#  if defined(SDE_BUILDING_LIBRARY)
#    define SDE_API __declspec(dllexport)
#  else
#    define SDE_API __declspec(dllimport)
#  endif
#else
#  define SDE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sde_status {
  SDE_OK = 0,
  SDE_ERR_INVALID_ARGUMENT = -1,
  SDE_ERR_IO = -2,
  SDE_ERR_FORMAT = -3,
  SDE_ERR_OUT_OF_MEMORY = -4,
  SDE_ERR_DEVICE = -5,
  SDE_ERR_CANCELLED = -6,
  SDE_ERR_INTERNAL = -7,
} sde_status;

/* Library version, "MAJOR.MINOR.PATCH". */
SDE_API const char *sde_version(void);

/* A static description of a status code. */
SDE_API const char *sde_status_str(sde_status status);

#ifdef __cplusplus
}
#endif
#endif /* SDENGINE_H */
