// AUTOMATIC1111's prompt syntax in C++, with the rules of sdengine/prompt_syntax.py: emphasis
// `(x)`, `(x:1.5)`, `[x]` and escapes, `BREAK`, 75-token windows (comma backtrack, added tokens
// kept whole), `<lora:name:w>` tags, and A1111's "Original" emphasis on the encoder output.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace sde {

class Tokenizer;

// [(text, weight)]: consecutive pieces of equal weight merged; a BREAK is ("BREAK", -1).
std::vector<std::pair<std::string, double>> parse_prompt_attention(const std::string &text);

// A `<lora:name:...>` tag: the file name, its UNet scale and its text-encoder scale (NaN: the UNet's).
struct LoraTag {
  std::string name;
  double scale = 1.0, text_scale;
};
// The prompt without its <lora:...> tags; the tags go to *tags. InvalidArgument for a bad scale.
std::string extract_lora_tags(const std::string &prompt, std::vector<LoraTag> *tags);

// One window: 77 ids (BOS, 75 tokens or padding, EOS / padding) and each id's weight.
struct PromptWindow {
  std::vector<int64_t> ids;
  std::vector<float> weights;
};
// A prompt (without tags) as A1111's windows of 75 tokens (prompt_syntax.chunk_prompt).
std::vector<PromptWindow> chunk_prompt(const Tokenizer &tokenizer, const std::string &prompt);

// A1111's "Original" emphasis on encoder outputs (rows, 77, D) with weights (rows, 77).
at::Tensor apply_emphasis(const at::Tensor &hidden, const at::Tensor &weights);

}  // namespace sde
