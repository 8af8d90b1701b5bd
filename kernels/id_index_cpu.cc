// The item-id index (id_index_api.h); its layout and probe are in id_index_impl.h.
//
// Lookups run in groups: hash every token of the group and prefetch its home slot first, then probe, so the
// group's cache misses are in flight together.
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "id_index_api.h"
#include "id_index_impl.h"

using namespace dpr_ids;

extern "C" {

const char* dpr_id_index_status_string(int status) {
  switch (status) {
    case DPR_IDX_OK: return "ok";
    case DPR_IDX_NULL_POINTER: return "null pointer";
    case DPR_IDX_BAD_ARGUMENT:
      return "bad argument (n < 0, offsets not increasing, more tokens than max_out, or a wire buffer its widths do "
             "not describe)";
    case DPR_IDX_DUPLICATE: return "two catalogue ids have the same bytes";
    case DPR_IDX_SEPARATOR: return "a catalogue id contains a NUL byte (the lookup separator)";
    case DPR_IDX_OUT_OF_MEMORY: return "out of memory";
    case DPR_IDX_UNKNOWN: return "an element is not a catalogue id";
    case DPR_IDX_HOLE: return "an empty element between two ids of a row";
    default: return "unknown status";
  }
}

int dpr_id_index_build(const char* blob, const int64_t* offsets, int64_t n, dpr_id_index** out) {
  if (out == nullptr || offsets == nullptr || (blob == nullptr && n > 0)) return DPR_IDX_NULL_POINTER;
  *out = nullptr;
  if (n < 0 || n >= 0xFFFFFFFFll || offsets[0] != 0) return DPR_IDX_BAD_ARGUMENT;
  for (int64_t i = 0; i < n; ++i)
    if (offsets[i + 1] < offsets[i]) return DPR_IDX_BAD_ARGUMENT;
  const int64_t bytes = offsets[n];
  if (bytes > 0 && std::memchr(blob, 0, static_cast<size_t>(bytes)) != nullptr) return DPR_IDX_SEPARATOR;
  dpr_id_index* idx = new (std::nothrow) dpr_id_index();
  if (idx == nullptr) return DPR_IDX_OUT_OF_MEMORY;
  try {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(2 * n)) cap <<= 1;   // load factor <= 1/2
    idx->slots.assign(cap, Slot{0, 0, 0, 0});
    idx->mask = cap - 1;
    idx->offsets.assign(offsets, offsets + n + 1);
    idx->blob.assign(blob, blob + bytes);
  } catch (const std::bad_alloc&) {
    delete idx;
    return DPR_IDX_OUT_OF_MEMORY;
  }
  const char* b = idx->blob.data();
  for (int64_t k = 0; k < n; ++k) {
    const char* p = b + offsets[k];
    const int64_t len = offsets[k + 1] - offsets[k];
    const uint64_t h = hash_bytes(p, len);
    const uint16_t tag = static_cast<uint16_t>(h >> 48);
    const uint64_t head = head_of(p, len);
    uint64_t i = h & idx->mask;
    for (;; i = (i + 1) & idx->mask) {
      const Slot& s = idx->slots[i];
      if (s.value == 0) break;
      if (idx->same_key(s, p, len, tag, head)) {
        delete idx;
        return DPR_IDX_DUPLICATE;
      }
    }
    idx->slots[i] = Slot{static_cast<uint32_t>(k + 1), static_cast<uint16_t>(len >= kLongKey ? kLongKey : len), tag,
                         head};
  }
  *out = idx;
  return DPR_IDX_OK;
}

int dpr_id_index_lookup(const dpr_id_index* index, const char* buf, int64_t len, int64_t* out, int64_t max_out,
                        int64_t* n_tokens) {
  if (index == nullptr || n_tokens == nullptr || (buf == nullptr && len > 0) || (out == nullptr && max_out > 0))
    return DPR_IDX_NULL_POINTER;
  if (len < 0 || max_out < 0) return DPR_IDX_BAD_ARGUMENT;
  *n_tokens = 0;
  if (len == 0) return DPR_IDX_OK;
  const char* starts[kGroup];
  int64_t lens[kGroup];
  uint64_t hashes[kGroup];
  int64_t t = 0;
  const char* p = buf;
  const char* end = buf + len;
  bool more = true;
  while (more) {
    int g = 0;
    for (; g < kGroup && more; ++g) {               // cut, hash and prefetch a group of tokens
      const void* z = std::memchr(p, 0, static_cast<size_t>(end - p));
      const char* e = z ? static_cast<const char*>(z) : end;
      starts[g] = p;
      lens[g] = e - p;
      hashes[g] = hash_bytes(p, lens[g]);
      __builtin_prefetch(&index->slots[hashes[g] & index->mask]);
      more = z != nullptr;
      p = e + 1;
    }
    for (int j = 0; j < g; ++j, ++t)
      if (t < max_out) out[t] = index->find(starts[j], lens[j], hashes[j]);
  }
  *n_tokens = t;
  return t > max_out ? DPR_IDX_BAD_ARGUMENT : DPR_IDX_OK;
}

int dpr_id_index_lookup_wire_rows(const dpr_id_index* index, const char* buf, int64_t len, const int64_t* widths,
                                  int64_t rows, int64_t* out, int64_t max_out, int64_t* lens, int64_t* n_out,
                                  int64_t* bad) {
  if (index == nullptr || n_out == nullptr || bad == nullptr || (buf == nullptr && len > 0) ||
      (out == nullptr && max_out > 0) || ((widths == nullptr || lens == nullptr) && rows > 0))
    return DPR_IDX_NULL_POINTER;
  *n_out = 0;
  *bad = -1;
  if (len < 0 || max_out < 0 || rows < 0) return DPR_IDX_BAD_ARGUMENT;
  // a group of ids is cut and hashed (their slots prefetched) before any is probed; probing writes their values
  const char* starts[kGroup];
  int64_t sizes[kGroup], elem[kGroup];
  uint64_t hashes[kGroup];
  int g = 0;
  int64_t off = 0, e = 0, t = 0;
  auto flush = [&]() -> bool {
    for (int j = 0; j < g; ++j) {
      const uint32_t v = index->find(starts[j], sizes[j], hashes[j]);
      if (v == 0) {
        *bad = elem[j];
        return false;
      }
      out[t - g + j] = v;
    }
    g = 0;
    return true;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t w = widths[r];
    if (w < 0) return DPR_IDX_BAD_ARGUMENT;
    int state = 0;                                  // 0: padding before the ids, 1: in the ids, 2: padding after
    int64_t count = 0;
    for (int64_t c = 0; c < w; ++c, ++e) {
      if (len - off < 4) return DPR_IDX_BAD_ARGUMENT;
      uint32_t n;
      std::memcpy(&n, buf + off, 4);                // little-endian, as x86-64 and aarch64 store it
      off += 4;
      if (static_cast<int64_t>(n) > len - off) return DPR_IDX_BAD_ARGUMENT;
      if (n == 0) {
        if (state == 1) state = 2;
      } else {
        if (state == 2) {
          if (!flush()) return DPR_IDX_UNKNOWN;     // an unknown id before the hole is the first problem
          *bad = e;
          return DPR_IDX_HOLE;
        }
        state = 1;
        if (t >= max_out) return DPR_IDX_BAD_ARGUMENT;
        starts[g] = buf + off;
        sizes[g] = n;
        elem[g] = e;
        hashes[g] = hash_bytes(buf + off, n);
        index->prefetch(hashes[g]);
        ++g;
        ++t;
        ++count;
        if (g == kGroup && !flush()) return DPR_IDX_UNKNOWN;
      }
      off += n;
    }
    lens[r] = count;
  }
  if (!flush()) return DPR_IDX_UNKNOWN;
  if (off != len) return DPR_IDX_BAD_ARGUMENT;      // elements left over: the widths do not describe the buffer
  *n_out = t;
  return DPR_IDX_OK;
}

void dpr_id_index_free(dpr_id_index* index) { delete index; }

}  // extern "C"
