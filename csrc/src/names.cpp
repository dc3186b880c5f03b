// Sampler and schedule names: the tables of sdengine/samplers/names.py and config.py (generated
// into sampler_names.inc at build time) and the resolution rules of sdengine.samplers.resolve,
// conventions_for and resolve_a1111.
#include "names.h"

#include <cctype>
#include <cmath>
#include <cstdlib>

#include "errors.h"

namespace sde {
namespace {

#include "sampler_names.inc"

template <size_t N, size_t W>
const char *lookup(const char *const (&table)[N][W], const std::string &key, size_t column = 1) {
  for (const auto &row : table)
    if (key == row[0]) return row[column];
  return nullptr;
}

std::string trim(const std::string &s) {
  size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::string valid_samplers() {
  std::string out;
  for (const char *name : kCSamplers)
    if (lookup(kNames_samplers, normalize_name(name))) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

// names.a1111_sampler_label: A1111's label of a name as A1111 spells it, else "".
std::string a1111_label(const std::string &name) {
  std::string n = trim(name);
  if (lookup(kA1111Samplers, n)) return n;
  if (const char *label = lookup(kA1111SamplerAliases, n)) return label;
  return "";
}

// names.split_a1111_label: (sampler label, schedule label or "") of an A1111 name that may carry a schedule.
std::pair<std::string, std::string> split_a1111(const std::string &name) {
  std::string n = trim(name);
  if (!a1111_label(n).empty()) return {a1111_label(n), ""};
  std::string best_alias, best_label;
  for (const auto &row : kA1111ScheduleAliases) {  // the longest schedule alias that ends the name
    std::string alias = row[0];
    if (alias.size() <= best_alias.size() || n.size() <= alias.size() + 1) continue;
    if (n.compare(n.size() - alias.size(), alias.size(), alias) == 0 && n[n.size() - alias.size() - 1] == ' ' &&
        !a1111_label(n.substr(0, n.size() - alias.size() - 1)).empty())
      best_alias = alias, best_label = row[1];
  }
  if (best_alias.empty()) return {n, ""};
  return {a1111_label(n.substr(0, n.size() - best_alias.size() - 1)), best_label};
}

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

const char *sampler_name(sde_sampler s) { return s >= 0 && s < SDE_SAMPLER_COUNT ? kCSamplers[s] : nullptr; }

const char *schedule_name(sde_schedule s) { return s >= 0 && s < SDE_SCHEDULE_COUNT ? kCSchedules[s] : nullptr; }

sde_sampler sampler_of_name(const std::string &canonical) {
  for (int i = 0; i < SDE_SAMPLER_COUNT; ++i)
    if (canonical == kCSamplers[i]) return static_cast<sde_sampler>(i);
  throw InvalidArgument("unknown sampler '" + canonical + "'");
}

sde_schedule schedule_of_name(const std::string &canonical) {
  std::string name = canonical == "automatic" ? "default" : canonical == "ddim" ? "ddim_uniform" : canonical;
  for (int i = 0; i < SDE_SCHEDULE_COUNT; ++i)
    if (name == kCSchedules[i]) return static_cast<sde_schedule>(i);
  throw InvalidArgument("schedule '" + canonical + "' is not known to the native runtime");
}

std::string canonical_sampler(const std::string &name, std::string *implied_schedule) {
  std::string key = normalize_name(name);
  if (const char *v = lookup(kNames_samplers, key)) return v;
  for (const auto &row : kNames_schedules) {
    std::string sched = row[0];
    if (key.size() > sched.size() + 1 && key.compare(key.size() - sched.size(), sched.size(), sched) == 0 &&
        key[key.size() - sched.size() - 1] == ' ') {
      std::string prefix = key.substr(0, key.size() - sched.size() - 1);
      if (const char *v = lookup(kNames_samplers, prefix)) {
        if (implied_schedule) *implied_schedule = row[1];
        return v;
      }
    }
  }
  throw InvalidArgument("unknown sampler '" + name + "'; valid samplers: " + valid_samplers() +
                        " (A1111/ComfyUI names such as 'DPM++ 2M Karras' or 'Euler a' work too)");
}

void parse_sampler(const std::string &name, sde_sampler *sampler, sde_schedule *schedule, sde_conventions *conventions) {
  // conventions_for: sdengine's own names are diffusers'; A1111's spellings of a sampler are A1111's
  std::string stripped = trim(name);
  bool own = false;
  for (const auto &row : kNames_samplers) own = own || stripped == row[1];
  auto [label, schedule_label] = split_a1111(stripped);
  if (!own && !a1111_label(label).empty()) {
    const char *canonical = lookup(kA1111Samplers, label);
    if (sampler) *sampler = sampler_of_name(canonical);
    if (schedule && !schedule_label.empty()) *schedule = schedule_of_name(lookup(kA1111Schedules, schedule_label));
    if (conventions) *conventions = SDE_CONVENTIONS_A1111;
    return;
  }
  std::string implied;
  std::string canonical = canonical_sampler(stripped, &implied);
  if (sampler) *sampler = sampler_of_name(canonical);
  if (schedule && !implied.empty()) *schedule = schedule_of_name(implied);
  if (conventions) *conventions = SDE_CONVENTIONS_DIFFUSERS;
}

sde_schedule parse_schedule(const std::string &name, sde_conventions conventions) {
  if (conventions == SDE_CONVENTIONS_A1111) {
    if (const char *label = lookup(kA1111ScheduleAliases, trim(name)))
      return schedule_of_name(lookup(kA1111Schedules, label));
  }
  const char *v = lookup(kNames_schedules, normalize_name(name));
  if (!v) {
    std::string valid;
    for (const auto &row : kNames_schedules)
      if (valid.find(row[1]) == std::string::npos) valid += (valid.empty() ? "" : ", ") + std::string(row[1]);
    throw InvalidArgument("unknown schedule '" + name + "'; valid schedules: " + valid +
                          (conventions == SDE_CONVENTIONS_A1111 ? " (or A1111's labels)" : ""));
  }
  return schedule_of_name(v);
}

std::vector<std::pair<std::string, std::string>> name_table(const std::string &which) {
  std::vector<std::pair<std::string, std::string>> out;
  if (which == "samplers")
    for (const auto &row : kNames_samplers) out.emplace_back(row[0], row[1]);
  else
    for (const auto &row : kNames_schedules) out.emplace_back(row[0], row[1]);
  return out;
}

A1111Options a1111_options(sde_sampler s) {
  A1111Options o;
  const char *name = sampler_name(s);
  if (!name) return o;
  for (const auto &row : kA1111Samplers) {
    if (std::string(row[1]) != name) continue;
    o.known = true;
    o.label = row[0];
    o.scheduler = row[2];
    o.discard = row[3][0] == '1', o.brownian = row[4][0] == '1', o.ensd = row[5][0] == '1';
    o.has_eta = row[6][0] != '\0';
    o.eta = o.has_eta ? std::strtod(row[6], nullptr) : 0.0;
  }
  return o;
}

std::vector<std::pair<std::string, std::string>> scheduler_class_defaults(const std::string &sampler) {
  std::string cls = "DPMSolverMultistepScheduler";  // dpmpp_2m_sde, dpmpp_3m_sde: DPM-Solver's variants
  for (const auto &row : kSchedulerClassToSampler)
    if (sampler == row[1]) {
      cls = row[0];
      break;
    }
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto &row : kSchedulerClassDefaults)
    if (cls == row[0]) out.emplace_back(row[1], row[2]);
  return out;
}

const char *sd_pipeline_value(const std::string &key) { return lookup(kSdPipelineValues, key); }

std::vector<std::pair<std::string, std::string>> neutral_sampling_values() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto &row : kNeutralSamplingValues) out.emplace_back(row[0], row[1]);
  return out;
}

}  // namespace sde
