// CLIP's byte-level BPE tokenizer (Radford et al. 2021), with the same ids as the
// Python one (sdengine/tokenizer.py, which is transformers' CLIPTokenizer pipeline):
//   0. the special tokens (BOS, EOS, the pad token) are cut out of the raw prompt;
//   1. normalise each remaining piece: NFC, every run of whitespace to one space,
//      lowercase one character at a time;
//   2. split with CLIP's pattern  <special> | 's|'t|'re|'ve|'m|'ll|'d | \p{L}+ | \p{N} |
//      [^\s\p{L}\p{N}]+  (whitespace dropped), map UTF-8 bytes to GPT-2's printable chars;
//   3. BPE by merge rank, the word's last symbol carrying the suffix "</w>".
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sde {

class Tokenizer {
 public:
  // A Hugging Face tokenizer folder: vocab.json + merges.txt, or tokenizer.json; the pad
  // token and model_max_length from special_tokens_map.json / tokenizer_config.json.
  static Tokenizer from_folder(const std::string &folder);

  // The ids of one prompt (BPE, and added tokens): no BOS / EOS, no truncation.
  std::vector<int32_t> tokens(const std::string &prompt) const;
  // The same as units that stay together (sdengine.tokenizer.pieces): each BPE id alone, each
  // added token with all its ids (the flag: an added token).
  std::vector<std::pair<std::vector<int32_t>, bool>> pieces(const std::string &prompt) const;
  // Reads `token` in a prompt (ASCII letters in any case) as `ids` (textual inversion).
  void add_token(const std::string &token, const std::vector<int32_t> &ids);
  // Whether `token` already means something: a vocabulary entry (word or piece) or an added token.
  bool has_token(const std::string &token) const;
  // (max_length) ids: BOS, tokens (truncated to max_length - 2), EOS, pad.
  std::vector<int64_t> encode_padded(const std::string &prompt) const;

  int max_length() const { return max_length_; }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  const std::string &pad_token() const { return pad_token_; }
  int32_t max_id() const { return max_id_; }  // the largest id the tokenizer can emit

 private:
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int32_t> merge_ranks_;  // "left right" -> rank
  std::unordered_map<std::string, std::vector<int32_t>> added_;  // lowercased token -> ids
  std::string pad_token_ = "<|endoftext|>";
  int max_length_ = 77;
  int32_t bos_id_ = 0, eos_id_ = 0, pad_id_ = 0, max_id_ = 0;

  void finish(const std::string &where);
  void bpe_word(const std::vector<std::string> &symbols, std::vector<int32_t> &out) const;
  void encode_text(const std::u32string &text, std::vector<int32_t> &out) const;
  std::vector<int32_t> tokens_without_added(const std::string &prompt) const;
};

// UTF-8 <-> UTF-32 (invalid UTF-8 bytes become U+FFFD, as Python's "replace").
std::u32string utf8_to_utf32(const std::string &s);
std::string utf32_to_utf8(const std::u32string &s);
// NFC normalisation (canonical decomposition, canonical ordering, composition).
std::u32string nfc(const std::u32string &s);

}  // namespace sde
