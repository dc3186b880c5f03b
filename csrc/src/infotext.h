// A1111's infotext read into sde_gen_params (sdengine/infotext.py's rules): infotext.cpp.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "sdengine.h"

namespace sde {

struct Infotext {
  std::string prompt, negative_prompt;
  std::vector<std::pair<std::string, std::string>> fields;  // in their order, values unquoted
};

// infotext.parse_infotext: prompt, negative prompt and the fields of the last line.
Infotext parse_infotext(const std::string &text);
// infotext.request_arguments into *params (its prompts point into `info`); InvalidArgument naming
// each field the runtime cannot honour.
void infotext_params(const Infotext &info, sde_gen_params *params);

}  // namespace sde
