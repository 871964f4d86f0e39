// Large CPU buffers kept for reuse from one call to the next.
//
// A training step allocates tens of MB of intermediates (the input projection, the reserve,
// the gate gradients) and frees them when its backward pass ends; an inference call frees
// its output and statistics when the caller drops them. glibc serves buffers of that size
// with mmap, or from a heap it trims on free, so the next call writes to fresh pages: a
// page fault and a page clear every 4 KiB, 10-15% of a training step at T=100, B=32, H=128
// and 6% of a loop of inference calls at T=784, B=16, H=100 (docs/CPU.md). Like torch's CUDA
// caching allocator, the pool keeps freed buffers, up to a byte limit, and hands them out
// again.
//
// Only CPU tensors of at least kMinPooledBytes come from the pool; everything else is
// at::empty. The pool is a c10::Allocator, so a pooled tensor is an ordinary tensor in
// every respect (its storage resizes, through the pool) and serves outputs a caller keeps
// as well as intermediates. BNLSTM_CPU_POOL_MB sets the limit on the bytes kept while
// unused (default 512; 0 turns the pool off).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bnlstm {

class BufferPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinPooledBytes = size_t(1) << 20;

  // The process's pool. Never destroyed: a tensor freed during interpreter shutdown still
  // finds it.
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool(limit_from_environment());
    return *pool;
  }

  // An uninitialised tensor of `sizes`, from the pool where it is a large CPU tensor.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (options.device().type() != at::kCPU || bytes < kMinPooledBytes || limit_ == 0) {
      return at::empty(sizes, options);
    }
    return at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), options.memory_format_opt());
  }

  // c10::Allocator: a kept buffer of at least `bytes`, else a new one. The data pointer is
  // its own context (a "simple" DataPtr, as the default CPU allocator's), so the deleter
  // looks the capacity up. Small requests (a resize can make one) are served the same way
  // and freed, not kept, when their tensor dies.
  c10::DataPtr allocate(size_t bytes) override {
    size_t capacity = bytes;
    void* data = bytes >= kMinPooledBytes ? take(bytes, &capacity) : nullptr;
    if (data == nullptr) {
      data = c10::alloc_cpu(bytes);
      capacity = bytes;
    }
    {
      std::lock_guard<std::mutex> guard(mutex_);
      lent_[data] = capacity;
    }
    return {data, data, &release_buffer, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release_buffer; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every buffer the pool keeps; returns how many bytes that was.
  size_t release() {
    std::lock_guard<std::mutex> guard(mutex_);
    const size_t released = cached_bytes_;
    for (const Block& block : free_) c10::free_cpu(block.data);
    free_.clear();
    cached_bytes_ = 0;
    return released;
  }

  // (bytes kept unused now, buffers handed out again, buffers newly allocated)
  std::vector<int64_t> statistics() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {static_cast<int64_t>(cached_bytes_), hits_, misses_};
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  explicit BufferPool(size_t limit) : limit_(limit) {}

  static void release_buffer(void* data) { instance().give_back(data); }

  // Read at the pool's first use (the first CPU operator call that allocates, or the pool's
  // statistics or release), where a bad value raises (a RuntimeError in Python); the pool is
  // then not created, so every later use raises the same.
  static size_t limit_from_environment() {
    const char* value = std::getenv("BNLSTM_CPU_POOL_MB");
    if (value == nullptr || *value == '\0') return size_t(512) << 20;
    // Digits only: strtoull would take "abc" as 0 and "-1" as the largest value.
    constexpr size_t kMaxMegabytes = std::numeric_limits<size_t>::max() >> 20;
    size_t megabytes = 0;
    bool valid = true;
    for (const char* digit = value; *digit != '\0' && valid; ++digit) {
      valid = *digit >= '0' && *digit <= '9';
      const size_t next = valid ? static_cast<size_t>(*digit - '0') : 0;
      valid = valid && megabytes <= (kMaxMegabytes - next) / 10;
      if (valid) megabytes = megabytes * 10 + next;
    }
    TORCH_CHECK(valid, "BNLSTM_CPU_POOL_MB must be a non-negative integer number of MB (at most ", kMaxMegabytes,
                "; 0 turns the CPU buffer pool off), got \"", value, "\"");
    return megabytes << 20;
  }

  // The smallest kept buffer of at least `bytes` (and at most twice that, so a small request
  // never pins a large buffer), or null.
  void* take(size_t bytes, size_t* capacity) {
    std::lock_guard<std::mutex> guard(mutex_);
    size_t best = free_.size();
    for (size_t index = 0; index < free_.size(); ++index) {
      const size_t size = free_[index].bytes;
      if (size >= bytes && size <= 2 * bytes && (best == free_.size() || size < free_[best].bytes)) best = index;
    }
    if (best == free_.size()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    const Block block = free_[best];
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    cached_bytes_ -= block.bytes;
    *capacity = block.bytes;
    return block.data;
  }

  // Keeps a freed buffer of at least kMinPooledBytes, frees a smaller one; beyond the limit,
  // frees the oldest kept ones first.
  void give_back(void* data) {
    std::lock_guard<std::mutex> guard(mutex_);
    const auto lent = lent_.find(data);
    TORCH_INTERNAL_ASSERT(lent != lent_.end(), "a buffer the CPU buffer pool did not lend came back to it");
    const size_t bytes = lent->second;
    lent_.erase(lent);
    if (bytes < kMinPooledBytes) {
      c10::free_cpu(data);
      return;
    }
    free_.push_back({data, bytes});
    cached_bytes_ += bytes;
    while (cached_bytes_ > limit_ && !free_.empty()) {
      c10::free_cpu(free_.front().data);
      cached_bytes_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

  const size_t limit_;
  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
  std::unordered_map<void*, size_t> lent_;  // buffers in use: their capacity
  size_t cached_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// at::empty, from the buffer pool where that pays (see above).
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferPool::instance().empty(sizes, options);
}

}  // namespace bnlstm
