// The one owner of a libuv handle (uv_timer_t, uv_signal_t, uv_tcp_t, uv_poll_t...).
//
// libuv frees nothing: a handle's memory must stay valid from uv_*_init until its close
// callback runs, which is one loop iteration after uv_close, possibly after its owner is gone.
// And Loop::close() closes every handle still open, possibly before its owner is gone.
// UvHandle<T> allocates the handle beside a small record that the Loop knows about, so that
// whichever comes first closes it exactly once, and whichever comes last frees it:
//   - the owner lets go first (its destructor, or reset()): the handle is closed now and freed
//     by its close callback; the owner may be destroyed at once;
//   - Loop::close() comes first: it closes the handle (with the same close callback), which
//     marks it closed; the owner's destructor later frees it without calling libuv, even when
//     the Loop itself is gone by then.
// The handle's `data` belongs to the owner, as usual. Never call uv_close on a handle held by a
// UvHandle: use close() or reset(). Loop thread only.
#pragma once

#include <string>
#include <system_error>
#include <type_traits>
#include <utility>

#include <uv.h>

#include "squall/core/loop.hpp"

namespace squall {

template <typename T>
class UvHandle {
  static_assert(std::is_standard_layout_v<T>, "UvHandle holds libuv handle structs only");

 public:
  // Runs after the close callback while the owner still holds the handle (after close(), or
  // when Loop::close() closed it); the owner may destroy its UvHandle from inside.
  using OnClosed = void (*)(T* handle);

  // Holds nothing.
  UvHandle() noexcept = default;

  // Allocates a handle and initialises it with `init(loop.uv(), handle)` (uv_timer_init,
  // uv_signal_init, uv_tcp_init, or a lambda for the kinds that take more); its `data` is set
  // to `data`. Throws std::system_error naming `what` if `init` fails, std::logic_error if the
  // loop is closed.
  template <typename Init>
  UvHandle(Loop& loop, void* data, Init&& init, const char* what = "libuv handle") {
    if (loop.closed()) {
      throw std::logic_error(std::string("cannot open a ") + what + ": the loop is closed");
    }
    auto* block = new Block{};
    const int status = init(loop.uv(), &block->handle);
    if (status < 0) {
      // A failed init leaves the handle unknown to libuv: nothing to close.
      delete block;
      throw std::system_error(-status, std::generic_category(),
                              std::string("cannot open a ") + what + ": " + uv_strerror(status));
    }
    block->handle.data = data;
    block->link.handle = reinterpret_cast<uv_handle_t*>(&block->handle);
    block->link.close_callback = &UvHandle::on_close;
    loop.adopt_handle(block->link);
    block_ = block;
  }

  UvHandle(UvHandle&& other) noexcept : block_(std::exchange(other.block_, nullptr)) {}
  UvHandle& operator=(UvHandle&& other) noexcept {
    if (this != &other) {
      reset();
      block_ = std::exchange(other.block_, nullptr);
    }
    return *this;
  }
  UvHandle(const UvHandle&) = delete;
  UvHandle& operator=(const UvHandle&) = delete;
  ~UvHandle() { reset(); }

  // The handle, or null when this holds nothing. Still valid (but closed) after Loop::close().
  T* get() const noexcept { return block_ != nullptr ? &block_->handle : nullptr; }
  T* operator->() const noexcept { return get(); }
  uv_handle_t* handle() const noexcept { return reinterpret_cast<uv_handle_t*>(get()); }
  uv_stream_t* stream() const noexcept { return reinterpret_cast<uv_stream_t*>(get()); }
  explicit operator bool() const noexcept { return block_ != nullptr; }

  // Holds a handle that is neither closing nor closed (by close() or by Loop::close()): the
  // only state in which libuv may be asked to start anything on it.
  bool is_open() const noexcept { return block_ != nullptr && !uv_is_closing(handle()); }
  // The close callback ran (the handle is done with; its memory is still held here).
  bool is_closed() const noexcept { return block_ != nullptr && block_->link.closed; }

  // Runs `on_closed` when the close callback runs while this still holds the handle.
  void on_closed(OnClosed on_closed) noexcept {
    if (block_ != nullptr) block_->on_closed = on_closed;
  }

  // Closes the handle if it is open and keeps holding it until reset() or destruction.
  void close() noexcept {
    if (is_open()) uv_close(handle(), &UvHandle::on_close);
  }

  // Lets go of the handle: closes it if it is open; its memory is freed by the close callback,
  // or here if that already ran. Touches no Loop once the handle is closed.
  void reset() noexcept {
    Block* block = std::exchange(block_, nullptr);
    if (block == nullptr) return;
    block->link.owner_alive = false;
    if (block->link.closed) {
      delete block;
      return;
    }
    block->handle.data = nullptr;
    auto* handle = reinterpret_cast<uv_handle_t*>(&block->handle);
    // Closing already (close() or Loop::close()): the close callback sees owner_alive false.
    if (!uv_is_closing(handle)) uv_close(handle, &UvHandle::on_close);
  }

 private:
  // Standard layout with the handle first: a uv_handle_t* to it is a Block*.
  struct Block {
    T handle;                      // The libuv handle.
    detail::HandleLink link;       // In the Loop's list until the close callback.
    OnClosed on_closed = nullptr;  // The owner's hook.
  };

  static void on_close(uv_handle_t* handle) noexcept {
    auto* block = reinterpret_cast<Block*>(handle);
    block->link.unlink();
    block->link.closed = true;
    if (!block->link.owner_alive) {
      delete block;
      return;
    }
    // The hook may reset this handle: nothing touches the block afterwards.
    if (block->on_closed != nullptr) block->on_closed(&block->handle);
  }

  Block* block_ = nullptr;  // Owned; freed by reset() or the close callback, see above.
};

}  // namespace squall
