// Sampler and schedule names: the table of sdengine/samplers/names.py (generated into
// sampler_names.inc at build time) and the resolution rules of sdengine.samplers.resolve.
#include "names.h"

#include <cctype>

#include "errors.h"

namespace sde {
namespace {

#include "sampler_names.inc"

const char *const kSamplerNames[] = {"euler", "euler_a", "ddim", "dpmpp_2m", "pndm"};
const char *const kScheduleNames[] = {"default", "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"};

const char *lookup(const char *const (*table)[2], size_t n, const std::string &key) {
  for (size_t i = 0; i < n; ++i)
    if (key == table[i][0]) return table[i][1];
  return nullptr;
}

#define SDE_LOOKUP(table, key) lookup(kNames_##table, sizeof(kNames_##table) / sizeof(kNames_##table[0]), key)

}  // namespace

std::string normalize_name(const std::string &name) {
  std::string spaced;
  for (char c : name) {
    if (c == '_' || c == '-') c = ' ';
    spaced += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  std::string out;
  bool pending_space = false;
  for (char c : spaced) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += c;
  }
  return out;
}

const char *sampler_name(sde_sampler s) {
  return s >= 0 && s < SDE_SAMPLER_COUNT ? kSamplerNames[s] : nullptr;
}

const char *schedule_name(sde_schedule s) {
  return s >= 0 && s < SDE_SCHEDULE_COUNT ? kScheduleNames[s] : nullptr;
}

static sde_sampler native_sampler(const std::string &canonical, const std::string &given) {
  for (int i = 0; i < SDE_SAMPLER_COUNT; ++i)
    if (canonical == kSamplerNames[i]) return static_cast<sde_sampler>(i);
  throw InvalidArgument("sampler '" + given + "' (" + canonical +
                        ") is not implemented by the native runtime; it implements euler, euler_a, ddim, dpmpp_2m and pndm");
}

static sde_schedule schedule_enum(const std::string &canonical) {
  for (int i = 0; i < SDE_SCHEDULE_COUNT; ++i)
    if (canonical == kScheduleNames[i]) return static_cast<sde_schedule>(i);
  throw InvalidArgument("schedule '" + canonical + "' is not known to the native runtime");
}

std::string canonical_sampler(const std::string &name, std::string *implied_schedule) {
  std::string key = normalize_name(name);
  if (const char *v = SDE_LOOKUP(samplers, key)) return v;
  for (const auto &row : kNames_schedules) {
    std::string sched = row[0];
    if (key.size() > sched.size() + 1 && key.compare(key.size() - sched.size(), sched.size(), sched) == 0 &&
        key[key.size() - sched.size() - 1] == ' ') {
      std::string prefix = key.substr(0, key.size() - sched.size() - 1);
      if (const char *v = SDE_LOOKUP(samplers, prefix)) {
        if (implied_schedule) *implied_schedule = row[1];
        return v;
      }
    }
  }
  throw InvalidArgument("unknown sampler '" + name +
                        "'; valid samplers: euler, euler_a, ddim, dpmpp_2m, pndm (A1111/ComfyUI names such as "
                        "'DPM++ 2M Karras' or 'Euler a' work too)");
}

void parse_sampler(const std::string &name, sde_sampler *sampler, sde_schedule *schedule) {
  std::string implied;
  std::string canonical = canonical_sampler(name, &implied);
  sde_sampler s = native_sampler(canonical, name);
  if (sampler) *sampler = s;
  if (schedule && !implied.empty()) *schedule = schedule_enum(implied);
}

sde_schedule parse_schedule(const std::string &name) {
  const char *v = SDE_LOOKUP(schedules, normalize_name(name));
  if (!v)
    throw InvalidArgument("unknown schedule '" + name +
                          "'; valid schedules: default, normal, karras, exponential, sgm_uniform, simple, ddim_uniform");
  return schedule_enum(v);
}

std::vector<std::pair<std::string, std::string>> name_table(const std::string &which) {
  std::vector<std::pair<std::string, std::string>> out;
  if (which == "samplers")
    for (const auto &row : kNames_samplers) out.emplace_back(row[0], row[1]);
  else
    for (const auto &row : kNames_schedules) out.emplace_back(row[0], row[1]);
  return out;
}

}  // namespace sde
