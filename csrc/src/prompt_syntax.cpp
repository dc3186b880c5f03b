#include "prompt_syntax.h"

#include <ATen/ATen.h>

#include <cctype>
#include <cmath>
#include <cstdlib>

#include "errors.h"
#include "tokenizer.h"

namespace sde {
namespace {

constexpr int kChunkTokens = 75;     // tokens of a window between BOS and EOS
constexpr int kCommaBacktrack = 20;  // A1111's comma_padding_backtrack
constexpr double kRoundMultiplier = 1.1;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// prompt_syntax._BREAK.split: \s*\bBREAK\b\s* (word boundaries: ASCII word characters)
std::vector<std::string> split_break(const std::string &text) {
  auto word = [](unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; };
  std::vector<std::string> parts;
  size_t start = 0, search = 0;
  while (true) {
    size_t at = text.find("BREAK", search);
    if (at == std::string::npos) break;
    bool left = at == 0 || !word(static_cast<unsigned char>(text[at - 1]));
    bool right = at + 5 >= text.size() || !word(static_cast<unsigned char>(text[at + 5]));
    if (!left || !right) {
      search = at + 1;
      continue;
    }
    size_t b = at, e = at + 5;
    while (b > start && is_space(text[b - 1])) --b;
    while (e < text.size() && is_space(text[e])) ++e;
    parts.push_back(text.substr(start, b - start));
    start = search = e;
  }
  parts.push_back(text.substr(start));
  return parts;
}

}  // namespace

std::vector<std::pair<std::string, double>> parse_prompt_attention(const std::string &text) {
  std::vector<std::pair<std::string, double>> pieces;
  std::vector<size_t> round_open, square_open;
  auto multiply_from = [&](size_t start, double factor) {
    for (size_t k = start; k < pieces.size(); ++k)
      if (pieces[k].second != -1) pieces[k].second *= factor;
  };
  auto plain = [&](const std::string &token) {
    std::vector<std::string> parts = split_break(token);
    for (size_t k = 0; k < parts.size(); ++k) {
      if (k > 0) pieces.emplace_back("BREAK", -1.0);
      pieces.emplace_back(parts[k], 1.0);
    }
  };
  size_t i = 0, n = text.size();
  while (i < n) {
    char c = text[i];
    if (c == '\\') {  // \( \) \[ \] \\ are the characters; a lone backslash is itself
      if (i + 1 < n && (text[i + 1] == '(' || text[i + 1] == ')' || text[i + 1] == '[' || text[i + 1] == ']' ||
                        text[i + 1] == '\\')) {
        pieces.emplace_back(std::string(1, text[i + 1]), 1.0);
        i += 2;
      } else {
        pieces.emplace_back("", 1.0);  // _ATTENTION's lone "\\": token[1:] is empty
        i += 1;
      }
    } else if (c == '(') {
      round_open.push_back(pieces.size()), ++i;
    } else if (c == '[') {
      square_open.push_back(pieces.size()), ++i;
    } else if (c == ':') {
      // :\s*([+-]?[.\d]+)\s*\)  -- a weight closing a round bracket
      size_t j = i + 1;
      while (j < n && is_space(text[j])) ++j;
      size_t num = j;
      if (j < n && (text[j] == '+' || text[j] == '-')) ++j;
      size_t digits = j;
      while (j < n && (std::isdigit(static_cast<unsigned char>(text[j])) || text[j] == '.')) ++j;
      size_t num_end = j;
      while (j < n && is_space(text[j])) ++j;
      if (num_end > digits && j < n && text[j] == ')') {
        char *end = nullptr;
        std::string number = text.substr(num, num_end - num);
        double weight = std::strtod(number.c_str(), &end);
        bool valid = end && *end == '\0';
        if (round_open.empty()) {  // a weight that closes nothing: the token is text (":..." then ")")
          plain(text.substr(i, j + 1 - i));
        } else if (valid) {
          multiply_from(round_open.back(), weight);
          round_open.pop_back();
        } else {
          throw InvalidArgument("prompt: could not convert string to float: '" + number + "'");
        }
        i = j + 1;
      } else {
        plain(":"), ++i;
      }
    } else if (c == ')') {
      if (!round_open.empty()) {
        multiply_from(round_open.back(), kRoundMultiplier);
        round_open.pop_back();
      } else {
        plain(")");
      }
      ++i;
    } else if (c == ']') {
      if (!square_open.empty()) {
        multiply_from(square_open.back(), 1 / kRoundMultiplier);
        square_open.pop_back();
      } else {
        plain("]");
      }
      ++i;
    } else {
      size_t j = i;
      while (j < n && text[j] != '\\' && text[j] != '(' && text[j] != ')' && text[j] != '[' && text[j] != ']' &&
             text[j] != ':')
        ++j;
      plain(text.substr(i, j - i));
      i = j;
    }
  }
  for (size_t start : round_open) multiply_from(start, kRoundMultiplier);
  for (size_t start : square_open) multiply_from(start, 1 / kRoundMultiplier);
  if (pieces.empty()) pieces.emplace_back("", 1.0);
  std::vector<std::pair<std::string, double>> merged = {pieces[0]};
  for (size_t k = 1; k < pieces.size(); ++k) {
    if (pieces[k].second == merged.back().second) {
      merged.back().first += pieces[k].first;
    } else {
      merged.push_back(pieces[k]);
    }
  }
  return merged;
}

std::string extract_lora_tags(const std::string &prompt, std::vector<LoraTag> *tags) {
  // <lora:([^:>]+)((?::[^:>]*)*)>
  std::string out;
  size_t i = 0;
  while (i < prompt.size()) {
    size_t at = prompt.find("<lora:", i);
    if (at == std::string::npos) break;
    size_t close = prompt.find('>', at + 6);
    std::string inner = close == std::string::npos ? "" : prompt.substr(at + 6, close - at - 6);
    size_t colon = inner.find(':');
    std::string name = inner.substr(0, colon);
    if (close == std::string::npos || name.empty()) {
      out += prompt.substr(i, at + 1 - i);
      i = at + 1;
      continue;
    }
    std::vector<double> numbers;
    while (colon != std::string::npos) {
      size_t next = inner.find(':', colon + 1);
      std::string arg = inner.substr(colon + 1, next == std::string::npos ? std::string::npos : next - colon - 1);
      size_t b = arg.find_first_not_of(" \t"), e = arg.find_last_not_of(" \t");
      arg = b == std::string::npos ? "" : arg.substr(b, e - b + 1);
      if (!arg.empty()) {
        char *end = nullptr;
        double v = std::strtod(arg.c_str(), &end);
        if (*end) throw InvalidArgument(prompt.substr(at, close + 1 - at) + ": the scales of a LoRA tag are numbers (<lora:name:0.8>)");
        numbers.push_back(v);
      }
      colon = next;
    }
    bool finite = true;
    for (double v : numbers) finite = finite && std::isfinite(v);
    if (numbers.size() > 2 || !finite)
      throw InvalidArgument(prompt.substr(at, close + 1 - at) + ": a LoRA tag takes at most two finite scales, <lora:name:te:unet>");
    size_t b = name.find_first_not_of(" \t"), e = name.find_last_not_of(" \t");
    LoraTag tag;
    tag.name = b == std::string::npos ? "" : name.substr(b, e - b + 1);
    tag.text_scale = std::nan("");
    if (numbers.size() == 2) {
      tag.scale = numbers[1], tag.text_scale = numbers[0];
    } else {
      tag.scale = numbers.empty() ? 1.0 : numbers[0];
    }
    tags->push_back(tag);
    out += prompt.substr(i, at - i);
    i = close + 1;
  }
  out += prompt.substr(i);
  return out;
}

std::vector<PromptWindow> chunk_prompt(const Tokenizer &tokenizer, const std::string &prompt) {
  std::vector<int32_t> comma = tokenizer.tokens(",");
  int32_t comma_id = comma.size() == 1 ? comma[0] : -1;
  std::vector<PromptWindow> windows;
  std::vector<int64_t> ids;
  std::vector<float> weights;
  int last_comma = -1;
  auto close = [&] {
    int fill = kChunkTokens - static_cast<int>(ids.size());
    PromptWindow w;
    w.ids.push_back(tokenizer.bos_id());
    w.ids.insert(w.ids.end(), ids.begin(), ids.end());
    w.ids.push_back(tokenizer.eos_id());  // EOS after the text, then the pad token
    for (int k = 0; k < fill; ++k) w.ids.push_back(tokenizer.pad_id());
    w.weights.push_back(1.0f);
    w.weights.insert(w.weights.end(), weights.begin(), weights.end());
    for (int k = 0; k <= fill; ++k) w.weights.push_back(1.0f);
    windows.push_back(std::move(w));
    ids.clear(), weights.clear(), last_comma = -1;
  };
  for (const auto &[text, weight] : parse_prompt_attention(prompt)) {
    if (text == "BREAK" && weight == -1) {
      close();
      continue;
    }
    for (const auto &[unit, added] : tokenizer.pieces(text)) {
      if (unit.size() == 1 && unit[0] == comma_id) {
        last_comma = static_cast<int>(ids.size());
      } else if (static_cast<int>(ids.size()) == kChunkTokens && last_comma != -1 &&
                 static_cast<int>(ids.size()) - last_comma <= kCommaBacktrack) {
        size_t split = static_cast<size_t>(last_comma + 1);
        std::vector<int64_t> moved_ids(ids.begin() + split, ids.end());
        std::vector<float> moved_weights(weights.begin() + split, weights.end());
        ids.resize(split), weights.resize(split);
        close();
        ids = moved_ids, weights = moved_weights;
      }
      if (static_cast<int>(ids.size()) == kChunkTokens) close();
      if (added && static_cast<int>(ids.size() + unit.size()) > kChunkTokens) close();  // an added token stays whole
      ids.insert(ids.end(), unit.begin(), unit.end());
      weights.insert(weights.end(), unit.size(), static_cast<float>(weight));
    }
  }
  if (!ids.empty() || windows.empty()) close();
  return windows;
}

at::Tensor apply_emphasis(const at::Tensor &hidden, const at::Tensor &weights) {
  at::Tensor w = weights.to(hidden.device(), hidden.scalar_type());
  if (at::all(w == 1).item<bool>()) return hidden;
  at::Tensor original = hidden.mean({1, 2}, true);  // (rows, 1, 1)
  at::Tensor weighted = hidden * w.unsqueeze(2);
  return weighted * (original / weighted.mean({1, 2}, true));
}

}  // namespace sde
