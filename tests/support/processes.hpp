// Defines processes that tests register on an engine.
#pragma once

#include <string>

#include <catch2/catch.hpp>

#include "pop/engine/engine.hpp"

namespace pop::test {

// Registers `name`: a state-independent writer of args["value"] at args["path"] (default
// `output`), used to commit "concurrently" from inside another process's run.
inline void register_setter(engine& e, const std::string& name, const std::string& output) {
  REQUIRE(e.register_process({.name = name, .outputs = {output}}, [output](const context&,
                                                                           const json& args) {
             result r;
             r.set(args.value("path", output), args.at("value"));
             return r;
           }).ok());
}

}  // namespace pop::test
