#pragma once

#include <string>
#include <utility>
#include <vector>

#include "sdengine.h"

namespace sde {

// normalize(name): lower case, "_" and "-" as spaces, whitespace runs collapsed, stripped.
std::string normalize_name(const std::string &name);
const char *sampler_name(sde_sampler s);
const char *schedule_name(sde_schedule s);
sde_sampler sampler_of_name(const std::string &canonical);    // a C_SAMPLERS name; InvalidArgument otherwise
sde_schedule schedule_of_name(const std::string &canonical);  // a C_SCHEDULES name (or A1111's automatic / ddim)
// The canonical sdengine sampler name (any name of NAMES); sets *implied_schedule to the
// schedule a combined name carries ("DPM++ 2M Karras"). InvalidArgument if unknown.
std::string canonical_sampler(const std::string &name, std::string *implied_schedule);
// A sampler name under the vocabulary rules of sdengine.samplers (conventions_for, resolve,
// resolve_a1111): *conventions is A1111's when A1111 spells it ("Euler a", "DPM++ 2M Karras",
// "k_dpmpp_2m"), else diffusers'. A schedule the name carries sets *schedule (left alone else).
void parse_sampler(const std::string &name, sde_sampler *sampler, sde_schedule *schedule,
                   sde_conventions *conventions = nullptr);
// A schedule name in the vocabulary of `conventions` (A1111's labels and names under A1111's).
sde_schedule parse_schedule(const std::string &name, sde_conventions conventions = SDE_CONVENTIONS_DIFFUSERS);
// The compiled-in copy of NAMES["samplers"] / NAMES["schedules"], for the agreement test.
std::vector<std::pair<std::string, std::string>> name_table(const std::string &which);

// A1111's options of a sampler (names.py A1111_SAMPLERS).
struct A1111Options {
  bool known = false;        // one of A1111's samplers
  std::string label;         // "DPM++ 2M"
  std::string scheduler;     // its Automatic schedule ("" = Uniform)
  bool discard = false, brownian = false, ensd = false, has_eta = false;
  double eta = 0.0;
};
A1111Options a1111_options(sde_sampler s);

// config.py's scheduler tables: (key, JSON value) defaults of the diffusers class that runs
// `sampler`; the value diffusers' SD pipelines force for a key (nullptr: none); every sampling
// key with its neutral value.
std::vector<std::pair<std::string, std::string>> scheduler_class_defaults(const std::string &sampler);
const char *sd_pipeline_value(const std::string &key);
std::vector<std::pair<std::string, std::string>> neutral_sampling_values();

}  // namespace sde
