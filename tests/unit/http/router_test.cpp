#include "squall/http/router.hpp"

#include <doctest/doctest.h>

#include <stdexcept>

using squall::http::RouteParam;
using squall::http::Router;

namespace {
void noop(squall::http::Request&, squall::http::Responder) {}
}  // namespace

TEST_CASE("routes match by method and path, with parameters") {
  Router router;
  router.add("GET", "/plaintext", noop);
  router.add("GET", "/jobs/{id}", noop);
  router.add("POST", "/jobs", noop);
  std::vector<RouteParam> params;

  auto match = router.find("GET", "/plaintext", params);
  CHECK(match.status == 200);
  CHECK(match.route->pattern == "/plaintext");

  match = router.find("GET", "/jobs/42", params);
  REQUIRE(match.status == 200);
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "id");
  CHECK(params[0].value == "42");

  params.clear();
  CHECK(router.find("GET", "/jobs/", params).status == 404);
  CHECK(router.find("GET", "/jobs/1/2", params).status == 404);
  CHECK(router.find("GET", "/nope", params).status == 404);
  CHECK(params.empty());
}

TEST_CASE("a known path with another method is 405 with Allow") {
  Router router;
  router.add("GET", "/plaintext", noop);
  router.add("POST", "/echo", noop);
  std::vector<RouteParam> params;
  auto match = router.find("POST", "/plaintext", params);
  CHECK(match.status == 405);
  CHECK(match.allow == "GET, HEAD");
  match = router.find("GET", "/echo", params);
  CHECK(match.status == 405);
  CHECK(match.allow == "POST");
}

TEST_CASE("HEAD is answered by the GET route") {
  Router router;
  router.add("GET", "/plaintext", noop);
  std::vector<RouteParam> params;
  auto match = router.find("HEAD", "/plaintext", params);
  CHECK(match.status == 200);
  CHECK(match.route->method == "GET");
}

TEST_CASE("malformed and duplicate patterns are refused") {
  Router router;
  router.add("GET", "/a/{id}", noop);
  CHECK_THROWS_AS(router.add("GET", "/a/{id}", noop), std::invalid_argument);
  CHECK_THROWS_AS(router.add("GET", "a", noop), std::invalid_argument);
  CHECK_THROWS_AS(router.add("GET", "/a/x{id}", noop), std::invalid_argument);
}
