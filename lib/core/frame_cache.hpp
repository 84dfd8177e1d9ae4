// Coroutine frames kept for reuse by size class: 64, 128, ... bytes up to 1 KiB, at most
// kPerClass frames per class. Each thread has one (lib/core/task.cpp: allocate_frame and
// free_frame, off in an AddressSanitizer build, which must see every frame freed); the unit test
// drives an instance of its own, so the classes, the reuse and the drain are checked in every
// build. Trivially destructible and constant-initialized, so a thread_local one is usable until
// its thread ends; drain() frees what it keeps.
#pragma once

#include <cstddef>
#include <new>

namespace squall::detail {

class FrameCache {
 public:
  static constexpr std::size_t kStep = 64;     // Size classes: 64, 128, ... bytes,
  static constexpr std::size_t kClasses = 16;  // up to 1 KiB.
  static constexpr std::size_t kLargest = kStep * kClasses;
  static constexpr int kPerClass = 16;  // At most 16 kept per class.

  // What free() did with a frame.
  enum class Freed : unsigned char {
    deleted,     // Too large, its class full, or the cache drained: given to operator delete.
    kept,        // Kept for the next frame of its class.
    kept_first,  // Kept, and the first one its class holds.
  };

  // Whether a frame of `size` bytes goes by size class (else straight to operator new/delete).
  static constexpr bool by_class(std::size_t size) noexcept {
    return size != 0 && size <= kLargest;
  }
  // The class of a frame of `size` bytes (by_class(size)).
  static constexpr std::size_t size_class(std::size_t size) noexcept { return (size - 1) / kStep; }
  // The bytes allocate(size) gets: the whole class, so any frame of the class fits the block.
  static constexpr std::size_t block_size(std::size_t size) noexcept {
    return by_class(size) ? (size_class(size) + 1) * kStep : size;
  }

  // A block for a frame of `size` bytes: the frame of its class freed last, or a new one.
  void* allocate(std::size_t size) {
    if (!by_class(size)) return ::operator new(size);
    const std::size_t c = size_class(size);
    if (counts_[c] > 0) return blocks_[c][--counts_[c]];
    return ::operator new(block_size(size));
  }

  // Takes back a block allocate(size) gave (`size` as it was asked for).
  Freed free(void* frame, std::size_t size) noexcept {
    if (!by_class(size)) {
      ::operator delete(frame);
      return Freed::deleted;
    }
    const std::size_t c = size_class(size);
    if (drained_ || counts_[c] == kPerClass) {
      ::operator delete(frame);
      return Freed::deleted;
    }
    blocks_[c][counts_[c]++] = frame;
    return counts_[c] == 1 ? Freed::kept_first : Freed::kept;
  }

  // Frees every kept block; from now on free() deletes at once (the thread is ending).
  void drain() noexcept {
    drained_ = true;
    for (std::size_t c = 0; c < kClasses; ++c) {
      while (counts_[c] > 0) ::operator delete(blocks_[c][--counts_[c]]);
    }
  }

  // How many blocks class `c` keeps now.
  int kept(std::size_t c) const noexcept { return counts_[c]; }

 private:
  void* blocks_[kClasses][kPerClass] = {};  // blocks_[c][0 .. counts_[c]) are kept.
  int counts_[kClasses] = {};
  bool drained_ = false;
};

}  // namespace squall::detail
