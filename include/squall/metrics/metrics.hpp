// Process metrics exposed in the Prometheus text format 0.0.4: counters, gauges, histograms,
// optionally labelled. Updates are lock-free so that any thread may record them.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace squall::metrics {

template <class Metric>
class Family;

namespace detail {
struct ShardList;  // Finds, makes and frees the shards of a metric (metrics.cpp).
}  // namespace detail

// A share of a Counter that one thread alone adds to (a worker loop's hot path): a relaxed
// load and store, no locked instruction. Any thread may read it; the counter's value()
// includes it. Counter::shard_for() makes it; it lives as long as the counter.
class CounterShard {
 public:
  // Adds `n`. Only the shard's one writer thread may call it.
  void inc(std::uint64_t n = 1) noexcept {
    value_.store(value_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  std::uint64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  friend class Counter;
  friend struct detail::ShardList;
  explicit CounterShard(const void* owner) noexcept : owner_(owner) {}

  std::atomic<std::uint64_t> value_{0};
  const void* owner_;
  CounterShard* next_ = nullptr;
};

// A monotonically increasing count.
class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;
  ~Counter();

  // Adds `n` (relaxed atomic), from any thread.
  void inc(std::uint64_t n = 1) noexcept { value_.fetch_add(n, std::memory_order_relaxed); }
  // The current total, the shards' included.
  std::uint64_t value() const noexcept;
  // The shard that `owner` (one thread's object) alone adds to, made on first use: the same
  // owner gets the same shard. Keep the reference for the hot path.
  CounterShard& shard_for(const void* owner);

 private:
  std::atomic<std::uint64_t> value_{0};
  std::atomic<CounterShard*> shards_{nullptr};  // Pushed at the front; never shrinks.
};

// A value that goes up and down.
class Gauge {
 public:
  // Replaces the value.
  void set(double v) noexcept { value_.store(v, std::memory_order_relaxed); }
  // Adds `delta` (negative to decrease).
  void add(double delta) noexcept { value_.fetch_add(delta, std::memory_order_relaxed); }
  // The current value.
  double value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram;

// A share of a Histogram that one thread alone records into, without a locked instruction (as
// CounterShard). Histogram::shard_for() makes it; it lives as long as the histogram.
class HistogramShard {
 public:
  // Records one observation. Only the shard's one writer thread may call it.
  void observe(double value) noexcept;

 private:
  friend class Histogram;
  friend struct detail::ShardList;
  HistogramShard(const Histogram& histogram, const void* owner);

  const Histogram& histogram_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;  // As Histogram's.
  std::atomic<double> sum_{0.0};
  const void* owner_;
  HistogramShard* next_ = nullptr;
  std::size_t last_bucket_ = 0;  // Where the writer's last observation went (its thread only).
};

// Observations counted into buckets by upper bound (inclusive), plus their sum and count.
class Histogram {
 public:
  // `upper_bounds` must be finite and strictly increasing; +Inf is implied. Throws
  // std::invalid_argument.
  explicit Histogram(std::vector<double> upper_bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;
  ~Histogram();
  // Records one observation, from any thread; never allocates or locks. NaN lands in the +Inf
  // bucket.
  void observe(double value) noexcept;
  // The shard that `owner` (one thread's object) alone records into, made on first use: the
  // same owner gets the same shard. Keep the reference for the hot path.
  HistogramShard& shard_for(const void* owner);
  // The bucket upper bounds, without +Inf.
  const std::vector<double>& upper_bounds() const noexcept { return bounds_; }
  // Cumulative count of observations <= upper_bounds()[i]; i == upper_bounds().size() is +Inf.
  std::uint64_t cumulative_count(std::size_t i) const noexcept;
  // Number of observations (equal to the +Inf bucket).
  std::uint64_t count() const noexcept { return cumulative_count(bounds_.size()); }
  // Sum of all observations, the shards' included.
  double sum() const noexcept;

 private:
  template <class>
  friend class Family;  // Renders from one read of each bucket.
  friend class HistogramShard;
  std::size_t bucket_of(double value) const noexcept;
  std::uint64_t bucket_count(std::size_t i) const noexcept;  // Bucket i, the shards' included.

  std::vector<double> bounds_;
  // Per-bucket (non-cumulative) counts; the last one is +Inf. _count is derived from these so
  // that it always equals the +Inf bucket, even while observations race with a render.
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;
  std::atomic<double> sum_{0.0};
  std::atomic<HistogramShard*> shards_{nullptr};  // Pushed at the front; never shrinks.
};

// `count` bounds start, start*factor, start*factor^2, ... (rounded to 15 significant digits so
// labels read cleanly). Requires start > 0, factor > 1, count >= 1; throws std::invalid_argument.
std::vector<double> exponential_buckets(double start, double factor, std::size_t count);

namespace detail {

// What Registry needs from a family: its name and its exposition text.
class FamilyBase {
 public:
  virtual ~FamilyBase() = default;
  // The metric name.
  virtual const std::string& name() const noexcept = 0;
  // Appends HELP, TYPE and every sample line to `out`.
  virtual void render(std::string& out) const = 0;
};

}  // namespace detail

// Metrics of one name and type, one child per distinct set of label values.
template <class Metric>
class Family final : public detail::FamilyBase {
 public:
  // The child for these label values (in label_names order), created on first use. The reference
  // stays valid as long as the Registry; keep it on hot paths since lookup takes a mutex. Throws
  // std::invalid_argument naming the metric if the count differs from the label names.
  Metric& with(std::initializer_list<std::string_view> label_values);
  // Same, from a vector.
  Metric& with(const std::vector<std::string>& label_values);
  // The only child of a family without labels; throws std::logic_error if it has labels.
  Metric& get();

  // The metric name.
  const std::string& name() const noexcept override { return name_; }
  // The label names, in order.
  const std::vector<std::string>& label_names() const noexcept { return label_names_; }
  // Appends HELP, TYPE and every child's samples, in creation order.
  void render(std::string& out) const override;

 private:
  friend class Registry;
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> bounds);
  Metric& child(std::vector<std::string> label_values);

  std::string name_;
  std::string help_;
  std::vector<std::string> label_names_;
  std::vector<double> bounds_;  // Histograms only.
  mutable std::mutex mutex_;    // Guards children_ and index_ (not the metric values).
  std::deque<std::pair<std::vector<std::string>, Metric>> children_;  // Creation order.
  std::map<std::vector<std::string>, Metric*> index_;
  Metric* only_ = nullptr;  // The child of a family without labels.
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

// Owns every family and renders them in registration order.
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Registers a counter family. Throws std::invalid_argument for a bad or duplicate name or bad
  // label names.
  CounterFamily& counter(std::string name, std::string help,
                         std::vector<std::string> label_names = {});
  // Registers a gauge family; throws like counter().
  GaugeFamily& gauge(std::string name, std::string help, std::vector<std::string> label_names = {});
  // Registers a histogram family with these bucket bounds; throws like counter(), and for bad
  // bounds or a label named "le".
  HistogramFamily& histogram(std::string name, std::string help, std::vector<double> bounds,
                             std::vector<std::string> label_names = {});
  // Registers an unlabelled gauge read from `read` at each render (under the registry's lock, so
  // `read` must not call back into this Registry); throws like counter().
  void gauge_callback(std::string name, std::string help, std::function<double()> read);
  // A counter whose value is read at render time from a monotonic source the caller owns
  // (such as loop-thread statistics); same rules as gauge_callback.
  void counter_callback(std::string name, std::string help, std::function<std::uint64_t()> read);

  // The whole exposition (Content-Type: text/plain; version=0.0.4; charset=utf-8).
  std::string render() const;

 private:
  template <class F>
  F& add(std::unique_ptr<F> family);

  mutable std::mutex mutex_;  // Guards families_; held during render().
  std::vector<std::unique_ptr<detail::FamilyBase>> families_;
};

// Formats a sample value: integers exactly without exponent, otherwise the shortest round-trip
// form; "+Inf", "-Inf", "NaN".
std::string format_value(double value);

}  // namespace squall::metrics
