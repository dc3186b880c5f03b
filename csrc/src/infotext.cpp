// A1111's infotext (the `parameters` text of a PNG) read into sde_gen_params with the rules of
// sdengine/infotext.py: parse_infotext (prompt, negative prompt, the fields line) and
// request_arguments (each field that changes the image honoured, the descriptive ones kept,
// every other one refused by name).
#include "infotext.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <array>
#include <cstdlib>
#include <set>

#include "errors.h"
#include "json.h"
#include "names.h"

namespace sde {
namespace {

bool is_word(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }  // Python's \w, UTF-8 bytes as letters
bool is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string strip(const std::string &s) {
  size_t b = 0, e = s.size();
  while (b < e && is_space(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && is_space(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

// One `key: value` of the fields line at `pos` (infotext._FIELD: \s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)).
bool match_field(const std::string &line, size_t pos, size_t *end, std::string *key, std::string *value, bool *quoted) {
  size_t i = pos, n = line.size();
  while (i < n && is_space(static_cast<unsigned char>(line[i]))) ++i;
  if (i >= n || !is_word(static_cast<unsigned char>(line[i]))) return false;
  size_t key_start = i++;
  auto in_key = [](unsigned char c) { return is_word(c) || c == ' ' || c == '-' || c == '/'; };
  size_t run = i;
  while (run < n && in_key(static_cast<unsigned char>(line[run]))) ++run;
  if (run == i || run >= n || line[run] != ':') return false;
  *key = line.substr(key_start, run - key_start);
  i = run + 1;
  while (i < n && is_space(static_cast<unsigned char>(line[i]))) ++i;
  if (i < n && line[i] == '"') {  // a JSON string, if a ',' or the end follows it
    size_t j = i + 1;
    bool closed = false;
    while (j < n) {
      if (line[j] == '\\' && j + 1 < n) {
        j += 2;
      } else if (line[j] == '"') {
        closed = j > i + 1;
        break;
      } else {
        ++j;
      }
    }
    if (closed && (j + 1 == n || line[j + 1] == ',')) {
      *value = line.substr(i, j + 1 - i);
      *quoted = true;
      *end = j + 1 < n ? j + 2 : n;
      return true;
    }
  }
  size_t comma = line.find(',', i);
  *value = line.substr(i, (comma == std::string::npos ? n : comma) - i);
  *quoted = false;
  *end = comma == std::string::npos ? n : comma + 1;
  return true;
}

std::vector<std::pair<std::string, std::string>> find_fields(const std::string &line) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t pos = 0;
  while (pos < line.size()) {
    size_t end;
    std::string key, value;
    bool quoted;
    if (!match_field(line, pos, &end, &key, &value, &quoted)) {
      ++pos;
      continue;
    }
    if (quoted && value.size() >= 2) {
      try {
        Json j = Json::parse(value, "infotext value");
        if (j.is_string()) value = j.str();
      } catch (const Error &) {
      }
    }
    out.emplace_back(strip(key), strip(value));
    pos = end;
  }
  return out;
}

[[noreturn]] void refuse(const std::string &message) { throw InvalidArgument("infotext " + message); }

bool parse_size(const std::string &s, int *w, int *h) {
  size_t x = s.find('x');
  if (x == std::string::npos || x == 0 || x + 1 >= s.size()) return false;
  for (size_t k = 0; k < s.size(); ++k)
    if (k != x && !std::isdigit(static_cast<unsigned char>(s[k]))) return false;
  *w = std::atoi(s.substr(0, x).c_str()), *h = std::atoi(s.substr(x + 1).c_str());
  return true;
}

// (major, minor, patch, commits past the tag) of "v1.7.0-225-g..."; false when it is not one.
bool parse_version(const std::string &text, std::array<long, 4> *out) {
  std::string s = strip(text);
  size_t i = s.size() && s[0] == 'v' ? 1 : 0;
  *out = {0, 0, 0, 0};
  auto number = [&](long *v) {
    size_t b = i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    if (i == b) return false;
    *v = std::atol(s.substr(b, i - b).c_str());
    return true;
  };
  if (!number(&(*out)[0]) || i >= s.size() || s[i] != '.') return false;
  ++i;
  if (!number(&(*out)[1])) return false;
  if (i < s.size() && s[i] == '.') {
    ++i;
    if (!number(&(*out)[2])) return false;
  }
  if (i < s.size() && s[i] == '-') {  // -\w*?(\d+): the first run of digits after the dash
    ++i;
    while (i < s.size() && is_word(static_cast<unsigned char>(s[i])) && !std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    number(&(*out)[3]);
  }
  return true;
}

}  // namespace

Infotext parse_infotext(const std::string &text) {
  std::string body = strip(text);
  std::vector<std::string> lines;
  size_t start = 0;
  while (true) {
    size_t nl = body.find('\n', start);
    lines.push_back(body.substr(start, nl == std::string::npos ? std::string::npos : nl - start));
    if (nl == std::string::npos) break;
    start = nl + 1;
  }
  std::string last = lines.back();
  lines.pop_back();
  auto fields = find_fields(last);
  if (fields.size() < 3) {  // no fields line: everything is prompt
    lines.push_back(last);
    fields.clear();
  }
  Infotext info;
  std::vector<std::string> prompt, negative;
  bool in_negative = false;
  const std::string marker = "Negative prompt:";
  for (std::string line : lines) {
    line = strip(line);
    if (line.compare(0, marker.size(), marker) == 0) {
      in_negative = true;
      line = strip(line.substr(marker.size()));
    }
    (in_negative ? negative : prompt).push_back(line);
  }
  auto join = [](const std::vector<std::string> &parts) {
    std::string out;
    for (size_t i = 0; i < parts.size(); ++i) out += (i ? "\n" : "") + parts[i];
    return out;
  };
  info.prompt = join(prompt), info.negative_prompt = join(negative);
  for (auto &[key, value] : fields) {  // a repeated key keeps its last value, in its first place (a dict)
    bool found = false;
    for (auto &f : info.fields)
      if (f.first == key) f.second = value, found = true;
    if (!found) info.fields.emplace_back(key, value);
  }
  return info;
}

void infotext_params(const Infotext &info, sde_gen_params *p) {
  static const char *const kDescriptive[] = {"Model", "Model hash", "VAE", "VAE hash", "Version", "Lora hashes",
                                             "TI hashes", "Hashes", "Emphasis"};
  std::set<std::string> handled(std::begin(kDescriptive), std::end(kDescriptive));
  auto find = [&](const std::string &key) -> const std::string * {
    for (const auto &f : info.fields)
      if (f.first == key) return &f.second;
    return nullptr;
  };
  auto integer = [&](const std::string &key, long long fallback) {
    handled.insert(key);
    const std::string *v = find(key);
    if (!v) return fallback;
    char *end = nullptr;
    long long n = std::strtoll(v->c_str(), &end, 10);
    if (v->empty() || *end) refuse("field '" + key + "' must be an integer, got '" + *v + "'");
    return n;
  };
  auto number = [&](const std::string &key, double fallback, bool *present = nullptr) {
    handled.insert(key);
    const std::string *v = find(key);
    if (present) *present = v != nullptr;
    if (!v) return fallback;
    char *end = nullptr;
    double n = std::strtod(v->c_str(), &end);
    if (v->empty() || *end) refuse("field '" + key + "' must be a number, got '" + *v + "'");
    return n;
  };
  p->prompt = info.prompt.c_str();
  p->negative_prompt = info.negative_prompt.empty() ? nullptr : info.negative_prompt.c_str();
  p->prompt_syntax = SDE_PROMPT_SYNTAX_A1111;
  p->steps = static_cast<int>(integer("Steps", 20));
  p->guidance_scale = number("CFG scale", 7.0);
  if (find("Seed")) p->seed = static_cast<uint64_t>(integer("Seed", 0));
  for (const char *key : {"Size", "Sampler", "Schedule type", "RNG", "Sampler conventions", "Seed resize from",
                          "Beta schedule alpha", "Beta schedule beta", "Prompt syntax"})
    handled.insert(key);
  if (const std::string *size = find("Size"))
    if (!parse_size(*size, &p->width, &p->height)) refuse("field 'Size' must be WIDTHxHEIGHT, got '" + *size + "'");

  std::string conventions = find("Sampler conventions") ? *find("Sampler conventions") : "a1111";
  for (char &c : conventions) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (conventions != "a1111" && conventions != "diffusers")
    refuse("field 'Sampler conventions' must be a1111 or diffusers, got '" + *find("Sampler conventions") + "'");
  p->conventions = conventions == "a1111" ? SDE_CONVENTIONS_A1111 : SDE_CONVENTIONS_DIFFUSERS;
  std::string sampler_label = find("Sampler") ? *find("Sampler") : "DPM++ 2M";
  sde_sampler sampler;
  sde_schedule implied = SDE_SCHEDULE_COUNT;
  try {
    parse_sampler(sampler_label, &sampler, &implied, nullptr);
  } catch (const Error &e) {
    refuse(std::string("field 'Sampler': ") + e.what());
  }
  p->sampler = sampler;
  const std::string *schedule_field = find("Schedule type");
  sde_schedule schedule = SDE_SCHEDULE_COUNT;
  if (schedule_field && !schedule_field->empty() && *schedule_field != "Automatic") {
    try {
      schedule = parse_schedule(*schedule_field, p->conventions);
    } catch (const Error &e) {
      refuse(std::string("field 'Schedule type': ") + e.what());
    }
  }
  if (implied != SDE_SCHEDULE_COUNT && schedule != SDE_SCHEDULE_COUNT && implied != schedule)
    refuse("fields 'Sampler: " + sampler_label + "' and 'Schedule type: " + *schedule_field + "' disagree");
  if (schedule == SDE_SCHEDULE_COUNT) schedule = implied;
  std::array<long, 4> version;
  if (conventions == "a1111" && find("Version") && parse_version(*find("Version"), &version)) {
    if (version < std::array<long, 4>{1, 7, 0, 225})
      refuse("is from A1111 " + *find("Version") + ", whose alphas_cumprod were float16 ('Downcast alphas_cumprod'); "
             "sdengine draws what A1111 1.7.0-225 and later draw");
    if (version < std::array<long, 4>{1, 9, 0, 0} && schedule == SDE_SCHEDULE_COUNT &&
        !a1111_options(sampler).scheduler.empty())
      schedule = SDE_SCHEDULE_UNIFORM;  // before 1.9 a sampler label without a schedule used the model's sigmas
  }
  p->schedule = schedule == SDE_SCHEDULE_COUNT ? SDE_SCHEDULE_DEFAULT : schedule;
  for (const char *key : {"Beta schedule alpha", "Beta schedule beta"}) {
    bool present;
    double v = number(key, 0.6, &present);
    if (present && v != 0.6)
      refuse(std::string("field '") + key + "' is " + *find(key) + "; sdengine's Beta schedule has A1111's default 0.6");
  }
  // A1111 counts the last layer too: its "Clip skip: 2" is diffusers' clip_skip 1 (1 and below: none).
  // sde_model_generate checks the range.
  long long clip_skip = integer("Clip skip", 1);
  if (find("Clip skip"))
    p->clip_skip = static_cast<int>(std::clamp(clip_skip - 1, 0LL, static_cast<long long>(INT_MAX)));
  // No RNG field is A1111's default, its GPU generator, whose numbers NV draws on any device.
  std::string rng = find("RNG") ? *find("RNG") : "GPU";
  for (char &c : rng) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (rng != "cpu" && rng != "gpu" && rng != "nv") refuse("field 'RNG' must be CPU, GPU or NV, got '" + rng + "'");
  p->rng = rng == "cpu" ? SDE_RNG_CPU : SDE_RNG_NV;
  p->eta_noise_seed_delta = integer("ENSD", 0);
  double strength = number("Variation seed strength", 0.0);
  long long subseed = integer("Variation seed", -1);
  if (strength != 0) {
    if (subseed < 0) refuse("field 'Variation seed strength' needs 'Variation seed'");
    p->subseed_strength = strength, p->subseed = static_cast<uint64_t>(subseed);
  }
  if (const std::string *resize = find("Seed resize from"))
    if (!parse_size(*resize, &p->seed_resize_from_w, &p->seed_resize_from_h))
      refuse("field 'Seed resize from' must be WIDTHxHEIGHT, got '" + *resize + "'");
  if (const std::string *syntax = find("Prompt syntax")) {  // sdengine writes "plain" for a prompt read as plain text
    if (*syntax != "plain" && *syntax != "a1111") refuse("field 'Prompt syntax' must be plain or a1111, got '" + *syntax + "'");
    p->prompt_syntax = *syntax == "plain" ? SDE_PROMPT_SYNTAX_PLAIN : SDE_PROMPT_SYNTAX_A1111;
  }
  bool has_eta, has_eta_ddim;
  double eta = number("Eta", 0.0, &has_eta), eta_ddim = number("Eta DDIM", 0.0, &has_eta_ddim);
  if (has_eta || has_eta_ddim) p->eta = has_eta_ddim ? eta_ddim : eta;
  bool has_strength;
  double denoise = number("Denoising strength", 0.0, &has_strength);
  if (has_strength) p->strength = denoise;
  // training-free acceleration (sdengine/acceleration.py): DeepCache runs in the C loop (the app
  // loads its engine: sde_deepcache_load); T-GATE and ToMe do not, and off (0) is honoured
  long long interval = integer("DeepCache interval", 0), branch = integer("DeepCache branch", 0);
  if (interval < 0 || interval > 1000) refuse("field 'DeepCache interval' must be an integer in [0, 1000], got '" +
                                              *find("DeepCache interval") + "'");
  if (branch < 0 || branch > 1000) refuse("field 'DeepCache branch' must be an integer in [0, 1000], got '" +
                                          *find("DeepCache branch") + "'");
  if (interval > 0) {
    p->deepcache_interval = static_cast<int>(interval);
    p->deepcache_branch = static_cast<int>(branch);
  }
  for (const char *key : {"T-GATE gate step", "Token merging ratio"}) {
    if (number(key, 0.0) != 0)
      refuse(std::string("field '") + key + "' is " + *find(key) + ": T-GATE and ToMe run from Python, not in the C "
             "runtime; remove it to draw without it");
  }
  std::string refused;
  int count = 0;
  for (const auto &f : info.fields)
    if (!handled.count(f.first)) refused += std::string(count++ ? ", " : "") + "'" + f.first + "'";
  if (count)
    refuse(std::string("field") + (count > 1 ? "s " : " ") + refused + " cannot be honoured by sdengine (it would draw "
           "another image); remove " + (count > 1 ? "them" : "it") + " to draw without " + (count > 1 ? "them" : "it"));
}

}  // namespace sde
