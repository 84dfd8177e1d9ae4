#include "squall/metrics/metrics.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace squall::metrics;

TEST_CASE("counter family with labels renders in creation order") {
  Registry registry;
  auto& requests = registry.counter("http_requests_total", "Requests handled.", {"method", "code"});
  auto& get_ok = requests.with({"GET", "200"});
  get_ok.inc();
  get_ok.inc(2);
  requests.with({"POST", "500"}).inc();
  CHECK(&requests.with({"GET", "200"}) == &get_ok);  // Same child, stable reference.
  CHECK(&requests.with(std::vector<std::string>{"GET", "200"}) == &get_ok);
  CHECK(get_ok.value() == 3);
  CHECK(registry.render() ==
        "# HELP http_requests_total Requests handled.\n"
        "# TYPE http_requests_total counter\n"
        "http_requests_total{method=\"GET\",code=\"200\"} 3\n"
        "http_requests_total{method=\"POST\",code=\"500\"} 1\n");
}

TEST_CASE("unlabelled counter renders 0 before use and get() returns it") {
  Registry registry;
  auto& accepted = registry.counter("connections_accepted_total", "Accepted connections.");
  CHECK(registry.render() ==
        "# HELP connections_accepted_total Accepted connections.\n"
        "# TYPE connections_accepted_total counter\n"
        "connections_accepted_total 0\n");
  accepted.get().inc(5);
  CHECK(registry.render().ends_with("connections_accepted_total 5\n"));
}

TEST_CASE("gauges and callback gauges render in registration order") {
  Registry registry;
  auto& open = registry.gauge("open_connections", "Connections open now.");
  open.get().set(10);
  open.get().add(-3);
  CHECK(open.get().value() == 7.0);
  registry.gauge_callback("loop_lag_seconds", "Event loop lag.", [] { return 0.25; });
  auto& temp = registry.gauge("temperature", "Line one\nback\\slash.", {"room"});
  temp.with({"a"}).set(-1.5);
  temp.with({"b"}).set(1e6);
  CHECK(registry.render() ==
        "# HELP open_connections Connections open now.\n"
        "# TYPE open_connections gauge\n"
        "open_connections 7\n"
        "# HELP loop_lag_seconds Event loop lag.\n"
        "# TYPE loop_lag_seconds gauge\n"
        "loop_lag_seconds 0.25\n"
        "# HELP temperature Line one\\nback\\\\slash.\n"
        "# TYPE temperature gauge\n"
        "temperature{room=\"a\"} -1.5\n"
        "temperature{room=\"b\"} 1000000\n");
}

TEST_CASE("histogram renders cumulative buckets, sum and count") {
  Registry registry;
  auto& duration = registry.histogram("request_duration_seconds", "Request duration.",
                                      {0.005, 0.1, 1}, {"route"});
  auto& h = duration.with({"/echo"});
  for (double v : {0.001, 0.005, 0.05, 0.5, 2.0, 3.0}) h.observe(v);
  CHECK(h.count() == 6);
  CHECK(h.cumulative_count(0) == 2);  // 0.005 is inclusive.
  CHECK(h.cumulative_count(1) == 3);
  CHECK(h.cumulative_count(2) == 4);
  CHECK(h.cumulative_count(3) == 6);
  CHECK(h.sum() == doctest::Approx(5.556));
  std::string sum = format_value(h.sum());
  CHECK(registry.render() ==
        "# HELP request_duration_seconds Request duration.\n"
        "# TYPE request_duration_seconds histogram\n"
        "request_duration_seconds_bucket{route=\"/echo\",le=\"0.005\"} 2\n"
        "request_duration_seconds_bucket{route=\"/echo\",le=\"0.1\"} 3\n"
        "request_duration_seconds_bucket{route=\"/echo\",le=\"1\"} 4\n"
        "request_duration_seconds_bucket{route=\"/echo\",le=\"+Inf\"} 6\n"
        "request_duration_seconds_sum{route=\"/echo\"} " +
            sum +
            "\n"
            "request_duration_seconds_count{route=\"/echo\"} 6\n");
}

TEST_CASE("unlabelled histogram with integral sum") {
  Registry registry;
  auto& sizes = registry.histogram("body_bytes", "Body sizes.", {1024, 65536});
  sizes.get().observe(100);
  sizes.get().observe(2000);
  sizes.get().observe(std::nan(""));  // Counted in +Inf; makes the sum NaN.
  CHECK(registry.render() ==
        "# HELP body_bytes Body sizes.\n"
        "# TYPE body_bytes histogram\n"
        "body_bytes_bucket{le=\"1024\"} 1\n"
        "body_bytes_bucket{le=\"65536\"} 2\n"
        "body_bytes_bucket{le=\"+Inf\"} 3\n"
        "body_bytes_sum NaN\n"
        "body_bytes_count 3\n");
}

TEST_CASE("label values are escaped") {
  Registry registry;
  auto& family = registry.counter("odd_total", "Odd labels.", {"path"});
  family.with({"a\"b\\c\nd"}).inc();
  CHECK(registry.render() ==
        "# HELP odd_total Odd labels.\n"
        "# TYPE odd_total counter\n"
        "odd_total{path=\"a\\\"b\\\\c\\nd\"} 1\n");
}

TEST_CASE("invalid names and label counts throw naming the metric") {
  Registry registry;
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  CHECK(message([&] { registry.counter("1bad", "x"); }).find("1bad") != std::string::npos);
  CHECK(message([&] { registry.counter("bad-name", "x"); }).find("bad-name") != std::string::npos);
  CHECK(message([&] { registry.counter("", "x"); }).find("invalid metric name") !=
        std::string::npos);
  CHECK(message([&] { registry.counter("ok_total", "x", {"a:b"}); }).find("ok_total") !=
        std::string::npos);
  CHECK(message([&] { registry.counter("ok_total", "x", {"__reserved"}); }).find("ok_total") !=
        std::string::npos);
  CHECK(message([&] {
          registry.counter("ok_total", "x", {"a", "a"});
        }).find("duplicate") != std::string::npos);
  CHECK(message([&] { registry.histogram("h", "x", {1}, {"le"}); }).find("reserved") !=
        std::string::npos);
  CHECK(message([&] {
          registry.histogram("h", "x", {2, 1});
        }).find("increasing") != std::string::npos);
  CHECK(message([&] {
          registry.histogram("h", "x", {1, INFINITY});
        }).find("finite") != std::string::npos);

  auto& good = registry.counter("name:with_colon_total", "x", {"method"});
  CHECK(message([&] {
          good.with({"GET", "extra"});
        }).find("name:with_colon_total") != std::string::npos);
  CHECK(message([&] { good.with({}); }).find("expected 1 label values, got 0") !=
        std::string::npos);
  CHECK_THROWS_AS(good.get(), std::logic_error);
  CHECK(message([&] { registry.gauge("name:with_colon_total", "x"); }).find("already") !=
        std::string::npos);
}

TEST_CASE("format_value") {
  CHECK(format_value(0) == "0");
  CHECK(format_value(-0.0) == "0");
  CHECK(format_value(1) == "1");
  CHECK(format_value(0.005) == "0.005");
  CHECK(format_value(1e6) == "1000000");
  CHECK(format_value(9007199254740992.0) == "9007199254740992");
  CHECK(format_value(1e300) == "1e+300");
  CHECK(format_value(0.1 + 0.2) == "0.30000000000000004");
  CHECK(format_value(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(format_value(-std::numeric_limits<double>::infinity()) == "-Inf");
  CHECK(format_value(std::nan("")) == "NaN");
}

TEST_CASE("exponential_buckets") {
  CHECK(exponential_buckets(0.001, 2, 4) == std::vector<double>{0.001, 0.002, 0.004, 0.008});
  CHECK(exponential_buckets(0.001, 10, 4) == std::vector<double>{0.001, 0.01, 0.1, 1});
  CHECK(exponential_buckets(1, 4, 1) == std::vector<double>{1});
  CHECK_THROWS_AS(exponential_buckets(0, 2, 3), std::invalid_argument);
  CHECK_THROWS_AS(exponential_buckets(1, 1, 3), std::invalid_argument);
  CHECK_THROWS_AS(exponential_buckets(1, 2, 0), std::invalid_argument);
}

TEST_CASE("concurrent updates from several threads give exact totals") {
  Registry registry;
  auto& counter = registry.counter("hits_total", "Hits.", {"worker"});
  auto& shared = counter.with({"shared"});
  auto& hist = registry.histogram("latency", "Latency.", {0.5}).get();
  auto& gauge = registry.gauge("inflight", "In flight.").get();
  constexpr int kThreads = 8;
  constexpr int kIterations = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Children are created concurrently too, while others update and render.
      auto& own = counter.with({std::to_string(t)});
      for (int i = 0; i < kIterations; ++i) {
        shared.inc();
        own.inc(2);
        hist.observe(i % 2 == 0 ? 0.25 : 1.0);
        gauge.add(1);
        if (i % 5000 == 0) (void)registry.render();
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(shared.value() == std::uint64_t{kThreads} * kIterations);
  for (int t = 0; t < kThreads; ++t) {
    CHECK(counter.with({std::to_string(t)}).value() == 2u * kIterations);
  }
  CHECK(hist.count() == std::uint64_t{kThreads} * kIterations);
  CHECK(hist.cumulative_count(0) == std::uint64_t{kThreads} * kIterations / 2);
  CHECK(hist.sum() == doctest::Approx(kThreads * kIterations / 2 * 1.25));
  CHECK(gauge.value() == double{kThreads} * kIterations);
}

TEST_CASE("counter_callback renders a counter read at render time") {
  squall::metrics::Registry registry;
  std::uint64_t source = 7;
  registry.counter_callback("squall_things_total", "Things.", [&source] { return source; });
  CHECK(registry.render() ==
        "# HELP squall_things_total Things.\n# TYPE squall_things_total counter\n"
        "squall_things_total 7\n");
  source = 12345678901ULL;
  CHECK(registry.render().find("squall_things_total 12345678901\n") != std::string::npos);
}

TEST_CASE("shards: one writer thread each, summed with the shared value in reads and renders") {
  Registry registry;
  auto& counter = registry.counter("hits_total", "Hits.").get();
  auto& hist = registry.histogram("latency", "Latency.", {0.5}).get();
  constexpr int kThreads = 4;
  constexpr int kIterations = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Each thread's own object is the owner; shards are made while others write and render.
      const int owner = t;
      CounterShard& hits = counter.shard_for(&owner);
      HistogramShard& latency = hist.shard_for(&owner);
      CHECK(&counter.shard_for(&owner) == &hits);  // The same owner, the same shard.
      CHECK(&hist.shard_for(&owner) == &latency);
      for (int i = 0; i < kIterations; ++i) {
        hits.inc(2);
        counter.inc();  // The shared value, beside the shards.
        latency.observe(i % 2 == 0 ? 0.25 : 1.0);
        if (i % 5000 == 0) (void)registry.render();
      }
      CHECK(hits.value() == 2u * kIterations);
    });
  }
  for (auto& t : threads) t.join();
  hist.observe(0.1);  // Shared, beside the shards.
  const std::uint64_t total = std::uint64_t{kThreads} * kIterations;
  CHECK(counter.value() == 3 * total);
  CHECK(hist.count() == total + 1);
  CHECK(hist.cumulative_count(0) == total / 2 + 1);
  CHECK(hist.sum() == doctest::Approx(double(total) / 2 * 1.25 + 0.1));
  const std::string text = registry.render();
  CHECK(text.find("hits_total " + std::to_string(3 * total) + "\n") != std::string::npos);
  CHECK(text.find("latency_bucket{le=\"0.5\"} " + std::to_string(total / 2 + 1) + "\n") !=
        std::string::npos);
  CHECK(text.find("latency_count " + std::to_string(total + 1) + "\n") != std::string::npos);
}

TEST_CASE("a shard counts every value into the bucket the shared histogram does") {
  Registry registry;
  auto& shared = registry.histogram("shared", "Shared.", {0.001, 0.01, 0.1, 1}).get();
  auto& sharded = registry.histogram("sharded", "Sharded.", {0.001, 0.01, 0.1, 1}).get();
  const int owner = 0;
  HistogramShard& shard = sharded.shard_for(&owner);
  // Bounds themselves (inclusive), values just above them, repeats (the last bucket's test),
  // jumps both ways, the infinities and NaN.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (const double value :
       {0.05, 0.01, 0.005, 0.005, 0.01, 0.0100001, 0.1, 0.0005, 0.001, 0.0010001, 1.0,
        1.5,  1.5,  nan,   0.5,   -inf, 0.0,       inf, nan,    2.0,   0.001,     0.001}) {
    shared.observe(value);
    shard.observe(value);
  }
  for (std::size_t i = 0; i <= 4; ++i) {
    CAPTURE(i);
    CHECK(sharded.cumulative_count(i) == shared.cumulative_count(i));
  }
  CHECK(sharded.count() == 22);
}
