// The item-id index's layout and probe (internal to the ids_lib library): shared by the index's own C ABI
// (id_index_cpu.cc) and the /recommend body parser (recommend_parse_cpu.cc), which maps ids as it reads them.
// Open addressing, linear probing, 16-byte slots: a slot holds the value, the key's length, 16 bits of its hash
// and its first 8 bytes, so a probe of a key of at most 8 bytes is decided inside the slot (one cache line) and a
// longer key reads the copied key bytes only when length, hash bits and head all agree.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace dpr_ids {

constexpr uint32_t kLongKey = 0xFFFFu;   // stored length for keys of 65,535 bytes or more (compare in full)
constexpr int kGroup = 32;               // tokens hashed and prefetched before any of them is probed

struct Slot {
  uint32_t value;   // 0: empty
  uint16_t len;     // min(key length, kLongKey)
  uint16_t tag;     // hash bits 48..63
  uint64_t head;    // first 8 key bytes, zero-padded
};
static_assert(sizeof(Slot) == 16, "slot layout");

inline uint64_t hash_bytes(const char* p, int64_t n) {
  uint64_t h = 1469598103934665603ull;                     // FNV-1a, then murmur's 64-bit finaliser
  for (int64_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(p[i])) * 1099511628211ull;
  h ^= static_cast<uint64_t>(n);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

inline uint64_t head_of(const char* p, int64_t n) {
  uint64_t v = 0;
  std::memcpy(&v, p, static_cast<size_t>(n < 8 ? n : 8));
  return v;
}

}  // namespace dpr_ids

struct dpr_id_index {
  std::vector<dpr_ids::Slot> slots;
  std::vector<int64_t> offsets;   // n + 1
  std::vector<char> blob;
  uint64_t mask = 0;

  bool same_key(const dpr_ids::Slot& s, const char* p, int64_t n, uint16_t tag, uint64_t head) const {
    if (s.tag != tag || s.head != head) return false;
    const uint32_t len = n >= dpr_ids::kLongKey ? dpr_ids::kLongKey : static_cast<uint32_t>(n);
    if (s.len != len) return false;
    if (n <= 8) return true;                       // length and head equal: the same bytes
    const int64_t lo = offsets[s.value - 1], hi = offsets[s.value];
    return hi - lo == n && std::memcmp(blob.data() + lo + 8, p + 8, static_cast<size_t>(n - 8)) == 0;
  }

  uint32_t find(const char* p, int64_t n, uint64_t h) const {
    const uint16_t tag = static_cast<uint16_t>(h >> 48);
    const uint64_t head = dpr_ids::head_of(p, n);
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      const dpr_ids::Slot& s = slots[i];
      if (s.value == 0) return 0;
      if (same_key(s, p, n, tag, head)) return s.value;
    }
  }

  void prefetch(uint64_t h) const { __builtin_prefetch(&slots[h & mask]); }
};
