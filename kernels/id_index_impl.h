// The item-id index's layout and probe (internal to the ids_lib library): shared by the index's own C ABI
// (id_index_cpu.cc) and the body parsers (recommend_parse_cpu.cc, v2_json_parse_cpu.cc), which map the ids they read.
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

  // out[i] = the value of span i (span(i) -> {bytes, length}) for i in [0, n), a group at a time: hash and prefetch
  // the group's home slots, then probe, so the group's cache misses are in flight together. An empty span is 0
  // without a probe when `empty_is_padding`. Returns the ordinal of the first span that is not a key (out[i] is
  // then unset from there on), or -1 when every one is.
  template <class SpanAt>
  int64_t map_spans(int64_t n, SpanAt span, int64_t* out, bool empty_is_padding) const {
    uint64_t hashes[dpr_ids::kGroup];
    const char* starts[dpr_ids::kGroup];
    int64_t lens[dpr_ids::kGroup];
    for (int64_t g0 = 0; g0 < n; g0 += dpr_ids::kGroup) {
      const int64_t g1 = g0 + dpr_ids::kGroup < n ? g0 + dpr_ids::kGroup : n;
      for (int64_t i = g0; i < g1; ++i) {
        const auto sp = span(i);
        starts[i - g0] = sp.first;
        lens[i - g0] = sp.second;
        if (empty_is_padding && sp.second == 0) continue;
        hashes[i - g0] = dpr_ids::hash_bytes(sp.first, sp.second);
        prefetch(hashes[i - g0]);
      }
      for (int64_t i = g0; i < g1; ++i) {
        if (empty_is_padding && lens[i - g0] == 0) {
          out[i] = 0;
          continue;
        }
        const uint32_t v = find(starts[i - g0], lens[i - g0], hashes[i - g0]);
        if (v == 0) return i;
        out[i] = v;
      }
    }
    return -1;
  }
};
