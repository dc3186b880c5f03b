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
// The canonical sdengine sampler name (any known name, native or not); sets *implied_schedule
// to the schedule a combined name carries ("DPM++ 2M Karras"). InvalidArgument if unknown.
std::string canonical_sampler(const std::string &name, std::string *implied_schedule);
// A sampler this runtime implements (InvalidArgument otherwise, naming the reason).
void parse_sampler(const std::string &name, sde_sampler *sampler, sde_schedule *schedule);
sde_schedule parse_schedule(const std::string &name);
// The compiled-in copy of NAMES["samplers"] / NAMES["schedules"], for the agreement test.
std::vector<std::pair<std::string, std::string>> name_table(const std::string &which);

}  // namespace sde
