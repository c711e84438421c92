// Defines pop::json, the JSON value type used for state values, arguments and payloads.
#pragma once

#include <nlohmann/json.hpp>

namespace pop {

// The JSON value type of every state value, process argument and message payload. Objects are
// ordered by key, so materialised state is deterministic.
using json = nlohmann::json;

}  // namespace pop
