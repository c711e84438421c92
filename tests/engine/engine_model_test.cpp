// Property test: random execute / compare_and_swap / snapshot sequences against a std::map model.
#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <map>

#include "pop/engine/engine.hpp"

using pop::json;

namespace {

// The model: leaf paths -> integer values, plus the version.
using model_map = std::map<std::string, int>;

json materialise(const model_map& m) {
  json out = json::object();
  for (const auto& [p, v] : m)
    out[json::json_pointer("/" + [&] {
      std::string s = p;
      for (char& c : s) c = c == '.' ? '/' : c;
      return s;
    }())] = v;
  return out;
}

// Drops empty objects: groups and the domain may linger empty after deletes; the model has none.
void prune(json& j) {
  if (!j.is_object()) return;
  for (auto it = j.begin(); it != j.end();) {
    prune(*it);
    if (it->is_object() && it->empty()) {
      it = j.erase(it);
    } else {
      ++it;
    }
  }
}

const std::vector<std::string> keys = {"k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"};

std::string leaf(int group, int key) {
  return "domain.g" + std::to_string(group) + "." + keys[static_cast<std::size_t>(key)];
}

}  // namespace

TEST_CASE("random execute, compare_and_swap and snapshot sequences match a std::map model",
          "[engine][model]") {
  rc::prop("state and versions equal the model at every step", [] {
    auto e_owner = pop::test::must(
        pop::engine::open(pop::options{.outbox_path = "system.outbox", .audit_capacity = 0}));
    pop::engine& e = *e_owner;
    // put: sets a leaf; move: reads one leaf, adds it to another and deletes the source;
    // wipe: deletes a whole group.
    RC_ASSERT(e.register_process({.name = "put", .outputs = {"domain"}}, [](const pop::context&,
                                                                            const json& a) {
                 pop::result r;
                 r.set(a.at("path").get<std::string>(), a.at("value"));
                 return r;
               }).ok());
    RC_ASSERT(e.register_process({.name = "move", .inputs = {"domain"}, .outputs = {"domain"}},
                                 [](const pop::context& ctx, const json& a) {
                                   pop::result r;
                                   const auto from = a.at("from").get<std::string>();
                                   const auto to = a.at("to").get<std::string>();
                                   const auto v = ctx.find<int>(from);
                                   if (!v || from == to) return r;
                                   r.set(to, ctx.get_or<int>(to, 0) + *v);
                                   r.erase(from);
                                   return r;
                                 })
                  .ok());
    RC_ASSERT(e.register_process({.name = "wipe", .outputs = {"domain"}}, [](const pop::context&,
                                                                             const json& a) {
                 pop::result r;
                 r.erase(a.at("group").get<std::string>());
                 return r;
               }).ok());
    model_map model;
    std::uint64_t version = 0;
    std::vector<std::vector<std::string>> written{{}};  // written[v]: paths version v wrote
    const auto overlaps = [](const std::string& a, const std::string& b) {
      const auto within = [](const std::string& x, const std::string& y) {
        return y.rfind(x, 0) == 0 && (y.size() == x.size() || y[x.size()] == '.');
      };
      return within(a, b) || within(b, a);
    };
    std::vector<std::tuple<pop::snapshot, json, std::uint64_t>> kept;
    const int steps = *rc::gen::inRange(50, 400);
    for (int i = 0; i < steps; ++i) {
      const int g = *rc::gen::inRange(0, 3);
      const int k = *rc::gen::inRange(0, 8);
      const int op = *rc::gen::inRange(0, 6);
      if (op == 0) {
        const int v = *rc::gen::inRange(-100, 100);
        const auto r = e.execute("put", {{"path", leaf(g, k)}, {"value", v}});
        RC_ASSERT(r.ok());
        model[leaf(g, k)] = v;
        RC_ASSERT(r->version == ++version);
        written.push_back({leaf(g, k)});
      } else if (op == 1) {
        const std::string from = leaf(g, k);
        const std::string to = leaf(*rc::gen::inRange(0, 3), *rc::gen::inRange(0, 8));
        const auto r = e.execute("move", {{"from", from}, {"to", to}});
        RC_ASSERT(r.ok());
        if (model.count(from) && from != to) {
          model[to] = (model.count(to) ? model[to] : 0) + model[from];
          model.erase(from);
          RC_ASSERT(r->version == ++version);
          written.push_back({to, from});
        } else {
          RC_ASSERT(!r->changed);
        }
      } else if (op == 2) {
        const std::string group = "domain.g" + std::to_string(g);
        const auto r = e.execute("wipe", {{"group", group}});
        RC_ASSERT(r.ok());
        for (auto it = model.begin(); it != model.end();) {
          it = it->first.rfind(group + ".", 0) == 0 ? model.erase(it) : std::next(it);
        }
        RC_ASSERT(r->version == ++version);
        written.push_back({group});
      } else if (op == 3) {
        // Strict CAS, sometimes with a stale version.
        const bool stale = version > 0 && *rc::gen::arbitrary<bool>();
        const std::uint64_t expected = stale ? version - 1 : version;
        const int v = *rc::gen::inRange(-100, 100);
        const auto r = e.compare_and_swap(expected, {{leaf(g, k), json(v)}});
        RC_ASSERT(r.ok());
        RC_ASSERT(r->committed == !stale);
        if (!stale) {
          model[leaf(g, k)] = v;
          ++version;
          written.push_back({leaf(g, k)});
        }
        RC_ASSERT(r->version == version);
      } else if (op == 4) {
        // Key-level CAS on an old version: commits unless that leaf (or its group) changed since.
        const std::uint64_t back =
            *rc::gen::inRange<std::uint64_t>(0, std::min<std::uint64_t>(version, 5) + 1);
        const auto r =
            e.compare_and_swap(version - back, {{leaf(g, k), std::nullopt}}, pop::cas_mode::keys);
        RC_ASSERT(r.ok());
        bool clean = true;
        for (std::uint64_t w = version - back + 1; w <= version; ++w) {
          for (const auto& p : written[w]) clean = clean && !overlaps(p, leaf(g, k));
        }
        RC_ASSERT(r->committed == clean);
        if (r->committed) {
          model.erase(leaf(g, k));
          ++version;
          written.push_back({leaf(g, k)});
        }
        RC_ASSERT(r->version == version);
      } else {
        kept.emplace_back(e.snapshot(), materialise(model), version);
      }
      const pop::snapshot now = e.snapshot();
      RC_ASSERT(now.version() == version);
      json expected = materialise(model);
      json actual = now.to_json();

      prune(actual);
      RC_ASSERT(actual == expected);
    }
    for (auto& [snap, state, v] : kept) {
      json actual = snap.to_json();

      prune(actual);
      RC_ASSERT(snap.version() == v);
      RC_ASSERT(actual == state);
    }
  });
}
