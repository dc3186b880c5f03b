#include "tokenizer.h"

#include <cctype>

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

#include "errors.h"
#include "json.h"
#include "util.h"

namespace sde {
namespace {

#include "unicode_tables.inc"

template <size_t N>
bool in_ranges(const uint32_t (&table)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (table[mid][1] < cp) lo = mid + 1;
    else hi = mid;
  }
  return lo < N && table[lo][0] <= cp && cp <= table[lo][1];
}

template <size_t N, size_t W>
const uint32_t *find_row(const uint32_t (&table)[N][W], uint32_t cp) {
  size_t lo = 0, hi = N;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (table[mid][0] < cp) lo = mid + 1;
    else hi = mid;
  }
  return lo < N && table[lo][0] == cp ? table[lo] : nullptr;
}

bool is_letter(char32_t c) { return in_ranges(kLetterRanges, c); }
bool is_number(char32_t c) { return in_ranges(kNumberRanges, c); }

// Unicode White_Space: what \s matches in the Oniguruma regexes of `tokenizers`.
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

unsigned combining_class(char32_t c) {
  const uint32_t *row = find_row(kCombiningClass, c);
  return row ? row[1] : 0;
}

// Hangul syllables (Unicode 3.12): decomposed and composed arithmetically.
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

void decompose(char32_t c, std::u32string &out) {
  if (c >= kSBase && c < kSBase + kSCount) {
    int s = static_cast<int>(c - kSBase);
    out += static_cast<char32_t>(kLBase + s / kNCount);
    out += static_cast<char32_t>(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out += static_cast<char32_t>(kTBase + s % kTCount);
    return;
  }
  const uint32_t *row = find_row(kDecomposition, c);
  if (!row) {
    out += c;
    return;
  }
  decompose(row[1], out);
  if (row[2]) decompose(row[2], out);
}

char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  size_t lo = 0, hi = sizeof(kComposition) / sizeof(kComposition[0]);
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const uint32_t *r = kComposition[mid];
    if (r[0] < a || (r[0] == a && r[1] < b)) lo = mid + 1;
    else hi = mid;
  }
  const size_t n = sizeof(kComposition) / sizeof(kComposition[0]);
  if (lo < n && kComposition[lo][0] == a && kComposition[lo][1] == b) return kComposition[lo][2];
  return 0;
}

void append_lowercase(char32_t c, std::u32string &out) {
  if (c < 0x80) {
    out += (c >= 'A' && c <= 'Z') ? c + 32 : c;
    return;
  }
  const uint32_t *row = find_row(kLowercase, c);
  if (!row) {
    out += c;
    return;
  }
  for (int i = 1; i < 4 && row[i]; ++i) out += static_cast<char32_t>(row[i]);
}

// GPT-2's reversible byte -> printable character map (sdengine.tokenizer.byte_to_unicode).
const std::vector<std::string> &byte_symbols() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int shifted = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + shifted++);
      t[b] = utf32_to_utf8(std::u32string(1, cp));
    }
    return t;
  }();
  return table;
}

std::string read_text(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot open " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string token_content(const Json *v) {
  if (!v || v->is_null()) return "";
  if (v->is_string()) return v->str();
  if (v->is_object()) return v->get_string("content", "");
  return "";
}

}  // namespace

std::u32string utf8_to_utf32(const std::string &s) {
  std::u32string out;
  out.reserve(s.size());
  const auto *p = reinterpret_cast<const unsigned char *>(s.data());
  const auto *end = p + s.size();
  while (p < end) {
    unsigned char c = *p;
    char32_t cp;
    int extra;
    if (c < 0x80) { cp = c; extra = 0; }
    else if ((c & 0xE0) == 0xC0) { cp = c & 0x1F; extra = 1; }
    else if ((c & 0xF0) == 0xE0) { cp = c & 0x0F; extra = 2; }
    else if ((c & 0xF8) == 0xF0) { cp = c & 0x07; extra = 3; }
    else throw InvalidArgument("text is not valid UTF-8 (bad byte at offset " + std::to_string(p - reinterpret_cast<const unsigned char *>(s.data())) + ")");
    if (end - p <= extra) throw InvalidArgument("text is not valid UTF-8 (truncated character at its end)");
    for (int i = 1; i <= extra; ++i) {
      if ((p[i] & 0xC0) != 0x80) throw InvalidArgument("text is not valid UTF-8 (bad continuation byte)");
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    static const char32_t min_of[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min_of[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000))
      throw InvalidArgument("text is not valid UTF-8 (overlong form or invalid code point)");
    out += cp;
    p += extra + 1;
  }
  return out;
}

std::string utf32_to_utf8(const std::u32string &s) {
  std::string out;
  for (char32_t cp : s) append_utf8(out, cp);
  return out;
}

std::u32string nfc(const std::u32string &s) {
  // 1. canonical decomposition
  std::u32string d;
  d.reserve(s.size());
  for (char32_t c : s) decompose(c, d);
  // 2. canonical ordering: stable sort of each run of non-starters by combining class
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) { ++i; continue; }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // 3. canonical composition (Unicode 3.11, D117)
  if (d.empty()) return d;
  std::u32string out;
  out.reserve(d.size());
  size_t starter = std::u32string::npos;  // index in out of the last starter
  int last_class = -1;                     // class of the last character after it; -1: none
  for (char32_t c : d) {
    int cls = static_cast<int>(combining_class(c));
    // c can combine with the starter unless a character in between blocks it.
    if (starter != std::u32string::npos && (last_class == -1 || last_class < cls)) {
      char32_t composed = compose_pair(out[starter], c);
      if (composed) {
        out[starter] = composed;
        continue;
      }
    }
    if (cls == 0) {
      starter = out.size();
      last_class = -1;
    } else {
      last_class = cls;
    }
    out += c;
  }
  return out;
}

Tokenizer Tokenizer::from_folder(const std::string &folder) {
  if (!is_dir(folder)) throw IoError("tokenizer folder not found: " + folder);
  Tokenizer tok;
  std::string vocab_path = folder + "/vocab.json", merges_path = folder + "/merges.txt";
  std::string json_path = folder + "/tokenizer.json";
  std::vector<std::pair<std::string, std::string>> merges;
  if (!is_file(vocab_path) && !is_file(merges_path) && is_file(json_path)) {
    Json doc = Json::read_file(json_path);
    const Json *model = doc.find("model");
    if (!model || model->get_string("type", "") != "BPE")
      throw FormatError(json_path + ": expected a BPE tokenizer model");
    try {
      for (const auto &[token, id] : model->at("vocab").members()) tok.vocab_[token] = static_cast<int32_t>(id.integer());
      for (const auto &m : model->at("merges").array()) {
        if (m.is_string()) {
          const std::string &s = m.str();
          size_t space = s.find(' ');
          if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
            throw FormatError("merge '" + s + "' is not a pair of symbols");
          merges.emplace_back(s.substr(0, space), s.substr(space + 1));
        } else {
          const auto &pair = m.array();
          if (pair.size() != 2) throw FormatError("a merge is not a pair of symbols");
          merges.emplace_back(pair[0].str(), pair[1].str());
        }
      }
    } catch (const FormatError &e) {
      throw FormatError(json_path + ": " + e.what());
    }
  } else {
    for (const auto &path : {vocab_path, merges_path})
      if (!is_file(path)) throw IoError("tokenizer file missing: " + path);
    Json vocab = Json::read_file(vocab_path);
    if (!vocab.is_object()) throw FormatError(vocab_path + " is not a JSON object");
    for (const auto &[token, id] : vocab.members()) {
      if (!id.is_number()) throw FormatError(vocab_path + ": the id of token '" + token + "' is not a number");
      tok.vocab_[token] = static_cast<int32_t>(id.integer());
    }
    std::istringstream lines(read_text(merges_path));
    std::string line;
    int number = 0;
    while (std::getline(lines, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.rfind("#version", 0) == 0) continue;
      std::istringstream parts(line);
      std::string a, b, extra;
      if (!(parts >> a >> b) || (parts >> extra))
        throw FormatError(merges_path + ":" + std::to_string(number) + ": expected two symbols, got '" + line + "'");
      merges.emplace_back(a, b);
    }
  }
  for (size_t i = 0; i < merges.size(); ++i) {
    std::string key = merges[i].first + " " + merges[i].second;
    tok.merge_ranks_.emplace(key, static_cast<int32_t>(i));  // the first occurrence wins
  }
  for (const char *name : {"special_tokens_map.json", "tokenizer_config.json"}) {  // the latter wins
    std::string path = folder + "/" + name;
    if (!is_file(path)) continue;
    Json settings = Json::read_file(path);
    std::string pad = token_content(settings.find("pad_token"));
    if (!pad.empty()) tok.pad_token_ = pad;
    const Json *length = settings.find("model_max_length");
    if (length && length->is_number()) {
      double v = length->number();
      if (v >= 2 && v <= 10000 && v == static_cast<int>(v)) tok.max_length_ = static_cast<int>(v);
    }
  }
  tok.finish(folder);
  return tok;
}

void Tokenizer::finish(const std::string &where) {
  for (const std::string &name : {std::string("<|startoftext|>"), std::string("<|endoftext|>"), pad_token_})
    if (!vocab_.count(name)) throw FormatError(where + ": the tokenizer vocabulary has no token '" + name + "'");
  bos_id_ = vocab_.at("<|startoftext|>");
  eos_id_ = vocab_.at("<|endoftext|>");
  pad_id_ = vocab_.at(pad_token_);
  for (const auto &entry : vocab_) max_id_ = std::max(max_id_, entry.second);
}

void Tokenizer::bpe_word(const std::vector<std::string> &symbols_in, std::vector<int32_t> &out) const {
  std::vector<std::string> symbols = symbols_in;
  if (symbols.empty()) return;
  symbols.back() += "</w>";
  while (symbols.size() > 1) {
    int32_t best_rank = INT32_MAX;
    size_t best = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = merge_ranks_.find(symbols[i] + " " + symbols[i + 1]);
      if (it != merge_ranks_.end() && it->second < best_rank) {
        best_rank = it->second;
        best = i;
      }
    }
    if (best_rank == INT32_MAX) break;
    // Merge every occurrence of the best pair, left to right (as the BPE algorithm does).
    std::string left = symbols[best], right = symbols[best + 1];
    std::vector<std::string> merged;
    merged.reserve(symbols.size());
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        merged.push_back(left + right);
        i += 2;
      } else {
        merged.push_back(symbols[i]);
        ++i;
      }
    }
    symbols.swap(merged);
  }
  for (const auto &s : symbols) {
    auto it = vocab_.find(s);
    out.push_back(it != vocab_.end() ? it->second : eos_id_);  // unk_token is <|endoftext|>
  }
}

void Tokenizer::encode_text(const std::u32string &raw, std::vector<int32_t> &out) const {
  // 1. normalise: NFC, whitespace runs -> " ", per-character lowercase
  std::u32string composed = nfc(raw), text;
  for (size_t i = 0; i < composed.size();) {
    if (is_space(composed[i])) {
      while (i < composed.size() && is_space(composed[i])) ++i;
      text += U' ';
      continue;
    }
    append_lowercase(composed[i], text);
    ++i;
  }
  // 2. split with CLIP's pattern, 3. BPE each piece
  static const std::u32string specials[] = {U"<|startoftext|>", U"<|endoftext|>"};
  static const std::u32string contractions[] = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
  const auto &bytes = byte_symbols();
  auto emit = [&](size_t begin, size_t end) {
    std::string piece = utf32_to_utf8(text.substr(begin, end - begin));
    std::vector<std::string> symbols;
    for (unsigned char b : piece) symbols.push_back(bytes[b]);
    bpe_word(symbols, out);
  };
  size_t i = 0;
  while (i < text.size()) {
    bool matched = false;
    for (const auto *list : {specials, contractions}) {
      size_t count = list == specials ? 2 : 7;
      for (size_t k = 0; k < count && !matched; ++k) {
        const std::u32string &lit = list[k];
        if (text.compare(i, lit.size(), lit) == 0) {
          emit(i, i + lit.size());
          i += lit.size();
          matched = true;
        }
      }
      if (matched) break;
    }
    if (matched) continue;
    char32_t c = text[i];
    size_t j = i + 1;
    if (is_letter(c)) {
      while (j < text.size() && is_letter(text[j])) ++j;
    } else if (is_number(c)) {
      // a single digit
    } else if (!is_space(c)) {
      while (j < text.size() && !is_space(text[j]) && !is_letter(text[j]) && !is_number(text[j])) ++j;
    } else {
      i = j;  // whitespace is dropped
      continue;
    }
    emit(i, j);
    i = j;
  }
}

void Tokenizer::add_token(const std::string &token, const std::vector<int32_t> &ids) {
  std::string lower = token;
  for (char &c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  added_[lower] = ids;
}

bool Tokenizer::has_token(const std::string &token) const {
  std::string lower = token;
  for (char &c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return added_.count(lower) || vocab_.count(lower) || vocab_.count(lower + "</w>");
}

std::vector<int32_t> Tokenizer::tokens(const std::string &prompt) const {
  if (added_.empty()) return tokens_without_added(prompt);
  std::vector<int32_t> out;
  for (const auto &unit : pieces(prompt)) out.insert(out.end(), unit.first.begin(), unit.first.end());
  return out;
}

std::vector<std::pair<std::vector<int32_t>, bool>> Tokenizer::pieces(const std::string &prompt) const {
  std::vector<std::pair<std::vector<int32_t>, bool>> out;
  auto bpe = [&](const std::string &text) {
    for (int32_t id : tokens_without_added(text)) out.push_back({{id}, false});
  };
  if (added_.empty()) {
    bpe(prompt);
    return out;
  }
  // Added tokens (textual inversion) first, in the raw prompt: leftmost, longest first, ASCII
  // letters in any case (sdengine/tokenizer.py matches them case-insensitively too).
  std::vector<const std::pair<const std::string, std::vector<int32_t>> *> added;
  for (const auto &entry : added_) added.push_back(&entry);
  std::sort(added.begin(), added.end(), [](const auto *a, const auto *b) { return a->first.size() > b->first.size(); });
  auto matches = [&](size_t at, const std::string &token) {
    if (prompt.size() - at < token.size()) return false;
    for (size_t k = 0; k < token.size(); ++k)
      if (std::tolower(static_cast<unsigned char>(prompt[at + k])) != static_cast<unsigned char>(token[k])) return false;
    return true;
  };
  size_t start = 0, i = 0;
  while (i < prompt.size()) {
    const std::pair<const std::string, std::vector<int32_t>> *hit = nullptr;
    for (const auto *entry : added)
      if (!entry->first.empty() && matches(i, entry->first)) {
        hit = entry;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    if (i > start) bpe(prompt.substr(start, i - start));
    out.push_back({hit->second, true});
    i += hit->first.size();
    start = i;
  }
  if (start < prompt.size()) bpe(prompt.substr(start));
  return out;
}

std::vector<int32_t> Tokenizer::tokens_without_added(const std::string &prompt) const {
  // 0. special tokens are matched in the raw prompt (leftmost, longest first)
  std::u32string text = utf8_to_utf32(prompt);
  std::vector<std::pair<std::u32string, int32_t>> specials = {
      {U"<|startoftext|>", bos_id_}, {U"<|endoftext|>", eos_id_}, {utf8_to_utf32(pad_token_), pad_id_}};
  std::sort(specials.begin(), specials.end(),
            [](const auto &a, const auto &b) { return a.first.size() > b.first.size(); });
  std::vector<int32_t> out;
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const std::pair<std::u32string, int32_t> *hit = nullptr;
    for (const auto &s : specials)
      if (!s.first.empty() && text.compare(i, s.first.size(), s.first) == 0) {
        hit = &s;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    if (i > start) encode_text(text.substr(start, i - start), out);
    out.push_back(hit->second);
    i += hit->first.size();
    start = i;
  }
  if (start < text.size()) encode_text(text.substr(start), out);
  return out;
}

std::vector<int64_t> Tokenizer::encode_padded(const std::string &prompt) const {
  std::vector<int32_t> ids = tokens(prompt);
  size_t room = static_cast<size_t>(max_length_ - 2);
  if (ids.size() > room) ids.resize(room);
  std::vector<int64_t> out(static_cast<size_t>(max_length_), pad_id_);
  out[0] = bos_id_;
  for (size_t k = 0; k < ids.size(); ++k) out[k + 1] = ids[k];
  out[ids.size() + 1] = eos_id_;
  return out;
}

}  // namespace sde
