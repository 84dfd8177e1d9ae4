#include "squall/metrics/metrics.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "core/hot.hpp"

namespace squall::metrics {

namespace {

bool is_name_start(char c, bool allow_colon) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (allow_colon && c == ':');
}

bool is_name_char(char c, bool allow_colon) {
  return is_name_start(c, allow_colon) || (c >= '0' && c <= '9');
}

bool valid_name(std::string_view s, bool allow_colon) {
  if (s.empty() || !is_name_start(s[0], allow_colon)) return false;
  return std::all_of(s.begin(), s.end(), [&](char c) { return is_name_char(c, allow_colon); });
}

// Metric names: [a-zA-Z_:][a-zA-Z0-9_:]*; label names: [a-zA-Z_][a-zA-Z0-9_]*, and "__" is
// reserved for Prometheus itself, "le" for histogram buckets.
void validate_names(const std::string& name, const std::vector<std::string>& label_names,
                    bool histogram) {
  if (!valid_name(name, true)) {
    throw std::invalid_argument("metric \"" + name + "\": invalid metric name");
  }
  for (std::size_t i = 0; i < label_names.size(); ++i) {
    const std::string& label = label_names[i];
    if (!valid_name(label, false) || label.starts_with("__")) {
      throw std::invalid_argument("metric " + name + ": invalid label name \"" + label + "\"");
    }
    if (histogram && label == "le") {
      throw std::invalid_argument("metric " + name + ": label name \"le\" is reserved");
    }
    if (std::find(label_names.begin(), label_names.begin() + i, label) != label_names.begin() + i) {
      throw std::invalid_argument("metric " + name + ": duplicate label name \"" + label + "\"");
    }
  }
}

void append_escaped_label_value(std::string& out, std::string_view value) {
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
}

void append_escaped_help(std::string& out, std::string_view help) {
  for (char c : help) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
}

void append_header(std::string& out, const std::string& name, const std::string& help,
                   std::string_view type) {
  out += "# HELP ";
  out += name;
  out += ' ';
  append_escaped_help(out, help);
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

// Appends `{a="x",b="y"` plus `extra` (already formatted, e.g. `le="1"`) and `}`; nothing if both
// are empty.
void append_labels(std::string& out, const std::vector<std::string>& names,
                   const std::vector<std::string>& values, std::string_view extra = {}) {
  if (names.empty() && extra.empty()) return;
  out += '{';
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i];
    out += "=\"";
    append_escaped_label_value(out, values[i]);
    out += '"';
  }
  if (!extra.empty()) {
    if (!names.empty()) out += ',';
    out += extra;
  }
  out += '}';
}

void append_uint(std::string& out, std::uint64_t v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, end);
}

template <class M>
constexpr std::string_view type_name() {
  if constexpr (std::is_same_v<M, Counter>) return "counter";
  if constexpr (std::is_same_v<M, Gauge>) return "gauge";
  if constexpr (std::is_same_v<M, Histogram>) return "histogram";
}

}  // namespace

std::string format_value(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char buf[64];
  // Integers up to 2^53 are exact in a double, so print them plainly rather than as "1e+06".
  if (value == std::trunc(value) && std::fabs(value) <= 9007199254740992.0) {
    auto [end, ec] = std::to_chars(buf, buf + sizeof buf, static_cast<std::int64_t>(value));
    return std::string(buf, end);
  }
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, end);
}

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)),
      buckets_(std::make_unique<std::atomic<std::uint64_t>[]>(bounds_.size() + 1)) {
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    if (!std::isfinite(bounds_[i])) {
      throw std::invalid_argument("histogram bucket bounds must be finite");
    }
    if (i > 0 && !(bounds_[i - 1] < bounds_[i])) {
      throw std::invalid_argument("histogram bucket bounds must be strictly increasing");
    }
  }
}

// Shard lists only grow, at their front; shards are made rarely (once per writer and metric),
// so a lost race to push costs only a retry.
struct detail::ShardList {
  // `owner`'s shard in the list at `head`, pushed there by `make` if it has none.
  template <class Shard, class Make>
  static Shard& find_or_make(std::atomic<Shard*>& head, const void* owner, Make make) {
    Shard* first = head.load(std::memory_order_acquire);
    for (;;) {
      for (Shard* shard = first; shard != nullptr; shard = shard->next_) {
        if (shard->owner_ == owner) return *shard;
      }
      std::unique_ptr<Shard> made = make();
      made->next_ = first;
      // On failure `first` is the new head, and the search runs again over it.
      if (head.compare_exchange_strong(first, made.get(), std::memory_order_acq_rel)) {
        return *made.release();
      }
    }
  }

  // The sum of `read(shard)` over the list at `head`.
  template <class Shard, class Read>
  static auto total(const std::atomic<Shard*>& head, Read read) noexcept {
    decltype(read(*head.load())) sum{};
    for (const Shard* shard = head.load(std::memory_order_acquire); shard != nullptr;
         shard = shard->next_) {
      sum += read(*shard);
    }
    return sum;
  }

  template <class Shard>
  static void free_all(std::atomic<Shard*>& head) noexcept {
    for (Shard* shard = head.load(std::memory_order_acquire); shard != nullptr;) {
      Shard* next = shard->next_;
      delete shard;
      shard = next;
    }
  }
};

Counter::~Counter() {
  detail::ShardList::free_all(shards_);
}

std::uint64_t Counter::value() const noexcept {
  return value_.load(std::memory_order_relaxed) +
         detail::ShardList::total(shards_, [](const CounterShard& shard) { return shard.value(); });
}

CounterShard& Counter::shard_for(const void* owner) {
  return detail::ShardList::find_or_make(
      shards_, owner, [owner] { return std::unique_ptr<CounterShard>(new CounterShard(owner)); });
}

Histogram::~Histogram() {
  detail::ShardList::free_all(shards_);
}

SQUALL_HOT std::size_t Histogram::bucket_of(double value) const noexcept {
  if (std::isnan(value)) return bounds_.size();  // +Inf.
  // Buckets are "less than or equal": the first bound >= value.
  return static_cast<std::size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                  bounds_.begin());
}

void Histogram::observe(double value) noexcept {
  buckets_[bucket_of(value)].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

HistogramShard& Histogram::shard_for(const void* owner) {
  return detail::ShardList::find_or_make(shards_, owner, [this, owner] {
    return std::unique_ptr<HistogramShard>(new HistogramShard(*this, owner));
  });
}

std::uint64_t Histogram::bucket_count(std::size_t i) const noexcept {
  return buckets_[i].load(std::memory_order_relaxed) +
         detail::ShardList::total(shards_, [i](const HistogramShard& shard) {
           return shard.buckets_[i].load(std::memory_order_relaxed);
         });
}

double Histogram::sum() const noexcept {
  return sum_.load(std::memory_order_relaxed) +
         detail::ShardList::total(shards_, [](const HistogramShard& shard) {
           return shard.sum_.load(std::memory_order_relaxed);
         });
}

std::uint64_t Histogram::cumulative_count(std::size_t i) const noexcept {
  std::uint64_t total = 0;
  for (std::size_t b = 0; b <= i && b <= bounds_.size(); ++b) total += bucket_count(b);
  return total;
}

HistogramShard::HistogramShard(const Histogram& histogram, const void* owner)
    : histogram_(histogram),
      buckets_(std::make_unique<std::atomic<std::uint64_t>[]>(histogram.bounds_.size() + 1)),
      owner_(owner) {}

SQUALL_HOT void HistogramShard::observe(double value) noexcept {
  // One writer's observations mostly fall where its last one did (a server's request
  // durations): that bucket is tested first, the search runs otherwise. NaN fails both
  // compares and goes to the search, which puts it in +Inf.
  const std::vector<double>& bounds = histogram_.bounds_;
  std::size_t i = last_bucket_;
  if (!((i == bounds.size() || value <= bounds[i]) && (i == 0 || value > bounds[i - 1]))) {
    i = histogram_.bucket_of(value);
    last_bucket_ = i;
  }
  std::atomic<std::uint64_t>& bucket = buckets_[i];
  bucket.store(bucket.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  sum_.store(sum_.load(std::memory_order_relaxed) + value, std::memory_order_relaxed);
}

std::vector<double> exponential_buckets(double start, double factor, std::size_t count) {
  if (!(start > 0) || !std::isfinite(start)) {
    throw std::invalid_argument("exponential_buckets: start must be positive");
  }
  if (!(factor > 1) || !std::isfinite(factor)) {
    throw std::invalid_argument("exponential_buckets: factor must be greater than 1");
  }
  if (count < 1) throw std::invalid_argument("exponential_buckets: count must be at least 1");
  std::vector<double> bounds;
  bounds.reserve(count);
  double v = start;
  for (std::size_t i = 0; i < count; ++i) {
    // 0.001 * 10 is 0.010000000000000002 in binary; 15 digits turns it back into 0.01.
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.15g", v);
    double rounded = std::strtod(buf, nullptr);
    if (!std::isfinite(rounded)) throw std::invalid_argument("exponential_buckets: overflow");
    bounds.push_back(rounded);
    v *= factor;
  }
  return bounds;
}

template <class Metric>
Family<Metric>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                       std::vector<double> bounds)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      bounds_(std::move(bounds)) {
  // An unlabelled family has exactly one child; create it now so it renders as 0 before any use.
  if (label_names_.empty()) only_ = &child({});
}

template <class Metric>
Metric& Family<Metric>::with(std::initializer_list<std::string_view> label_values) {
  return child(std::vector<std::string>(label_values.begin(), label_values.end()));
}

template <class Metric>
Metric& Family<Metric>::with(const std::vector<std::string>& label_values) {
  return child(label_values);
}

template <class Metric>
Metric& Family<Metric>::get() {
  if (only_ == nullptr) {
    throw std::logic_error("metric " + name_ + ": get() on a family with labels; use with()");
  }
  return *only_;
}

template <class Metric>
Metric& Family<Metric>::child(std::vector<std::string> label_values) {
  if (label_values.size() != label_names_.size()) {
    throw std::invalid_argument("metric " + name_ + ": expected " +
                                std::to_string(label_names_.size()) + " label values, got " +
                                std::to_string(label_values.size()));
  }
  std::lock_guard lock(mutex_);
  if (auto it = index_.find(label_values); it != index_.end()) return *it->second;
  if constexpr (std::is_same_v<Metric, Histogram>) {
    children_.emplace_back(std::piecewise_construct, std::forward_as_tuple(label_values),
                           std::forward_as_tuple(bounds_));
  } else {
    children_.emplace_back(std::piecewise_construct, std::forward_as_tuple(label_values),
                           std::forward_as_tuple());
  }
  Metric* metric = &children_.back().second;
  index_.emplace(std::move(label_values), metric);
  return *metric;
}

template <class Metric>
void Family<Metric>::render(std::string& out) const {
  append_header(out, name_, help_, type_name<Metric>());
  std::lock_guard lock(mutex_);
  for (const auto& [values, metric] : children_) {
    if constexpr (std::is_same_v<Metric, Histogram>) {
      std::string le;
      std::uint64_t cumulative = 0;
      for (std::size_t i = 0; i <= bounds_.size(); ++i) {
        // Read each bucket once so that the printed buckets and _count agree.
        cumulative += metric.bucket_count(i);
        le = "le=\"";
        le += i < bounds_.size() ? format_value(bounds_[i]) : "+Inf";
        le += '"';
        out += name_;
        out += "_bucket";
        append_labels(out, label_names_, values, le);
        out += ' ';
        append_uint(out, cumulative);
        out += '\n';
      }
      out += name_;
      out += "_sum";
      append_labels(out, label_names_, values);
      out += ' ';
      out += format_value(metric.sum());
      out += '\n';
      out += name_;
      out += "_count";
      append_labels(out, label_names_, values);
      out += ' ';
      append_uint(out, cumulative);
      out += '\n';
    } else {
      out += name_;
      append_labels(out, label_names_, values);
      out += ' ';
      if constexpr (std::is_same_v<Metric, Counter>) {
        append_uint(out, metric.value());
      } else {
        out += format_value(metric.value());
      }
      out += '\n';
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

namespace {

// A gauge or counter whose value is read from a callback at render time.
class CallbackMetric final : public detail::FamilyBase {
 public:
  CallbackMetric(std::string name, std::string help, const char* type,
                 std::function<std::string()> read)
      : name_(std::move(name)), help_(std::move(help)), type_(type), read_(std::move(read)) {}
  const std::string& name() const noexcept override { return name_; }
  void render(std::string& out) const override {
    append_header(out, name_, help_, type_);
    out += name_;
    out += ' ';
    out += read_();
    out += '\n';
  }

 private:
  std::string name_;
  std::string help_;
  const char* type_;                   // "gauge" or "counter".
  std::function<std::string()> read_;  // The sample's value, formatted.
};

}  // namespace

Registry::Registry() = default;
Registry::~Registry() = default;

template <class F>
F& Registry::add(std::unique_ptr<F> family) {
  std::lock_guard lock(mutex_);
  for (const auto& f : families_) {
    if (f->name() == family->name()) {
      throw std::invalid_argument("metric " + family->name() + ": already registered");
    }
  }
  F& ref = *family;
  families_.push_back(std::move(family));
  return ref;
}

CounterFamily& Registry::counter(std::string name, std::string help,
                                 std::vector<std::string> label_names) {
  validate_names(name, label_names, false);
  return add(std::unique_ptr<CounterFamily>(
      new CounterFamily(std::move(name), std::move(help), std::move(label_names), {})));
}

GaugeFamily& Registry::gauge(std::string name, std::string help,
                             std::vector<std::string> label_names) {
  validate_names(name, label_names, false);
  return add(std::unique_ptr<GaugeFamily>(
      new GaugeFamily(std::move(name), std::move(help), std::move(label_names), {})));
}

HistogramFamily& Registry::histogram(std::string name, std::string help, std::vector<double> bounds,
                                     std::vector<std::string> label_names) {
  validate_names(name, label_names, true);
  try {
    Histogram check(bounds);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("metric " + name + ": " + e.what());
  }
  return add(std::unique_ptr<HistogramFamily>(new HistogramFamily(
      std::move(name), std::move(help), std::move(label_names), std::move(bounds))));
}

void Registry::gauge_callback(std::string name, std::string help, std::function<double()> read) {
  validate_names(name, {}, false);
  if (!read) throw std::invalid_argument("metric " + name + ": empty callback");
  add(std::make_unique<CallbackMetric>(std::move(name), std::move(help), "gauge",
                                       [read = std::move(read)] { return format_value(read()); }));
}

void Registry::counter_callback(std::string name, std::string help,
                                std::function<std::uint64_t()> read) {
  validate_names(name, {}, false);
  if (!read) throw std::invalid_argument("metric " + name + ": empty callback");
  add(std::make_unique<CallbackMetric>(
      std::move(name), std::move(help), "counter",
      [read = std::move(read)] { return std::to_string(read()); }));
}

std::string Registry::render() const {
  std::string out;
  std::lock_guard lock(mutex_);
  for (const auto& f : families_) f->render(out);
  return out;
}

}  // namespace squall::metrics
