// History padding (history_pad_api.h): per row a memset of the padding and a memcpy of the kept items.
#include <cstring>

#include "history_pad_api.h"

extern "C" const char* dpr_history_pad_status_string(int status) {
  switch (status) {
    case DPR_PAD_OK: return "ok";
    case DPR_PAD_NULL_POINTER: return "a null pointer";
    case DPR_PAD_OFFSETS_START: return "offsets must start at 0";
    case DPR_PAD_OFFSETS_ORDER: return "offsets must never decrease";
    case DPR_PAD_OFFSETS_END: return "the last offset must end within the flat array";
    case DPR_PAD_BAD_ARGUMENT: return "rows must be >= 0, width >= 1 and the flat length >= 0";
    default: return "unknown status";
  }
}

extern "C" int dpr_history_pad_left(const int64_t* flat, int64_t flat_len, const int64_t* offsets, int64_t rows,
                                    int64_t width, int64_t* out) {
  if (rows < 0 || width < 1 || flat_len < 0) return DPR_PAD_BAD_ARGUMENT;
  if (!offsets || (rows > 0 && !out) || (flat_len > 0 && !flat)) return DPR_PAD_NULL_POINTER;
  if (offsets[0] != 0) return DPR_PAD_OFFSETS_START;
  for (int64_t i = 0; i < rows; ++i)
    if (offsets[i + 1] < offsets[i]) return DPR_PAD_OFFSETS_ORDER;
  if (offsets[rows] > flat_len) return DPR_PAD_OFFSETS_END;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t end = offsets[i + 1];
    const int64_t len = end - offsets[i];
    const int64_t take = len < width ? len : width;      // the most recent items
    int64_t* row = out + i * width;
    if (take < width) std::memset(row, 0, static_cast<size_t>(width - take) * sizeof(int64_t));
    if (take > 0) std::memcpy(row + (width - take), flat + (end - take), static_cast<size_t>(take) * sizeof(int64_t));
  }
  return DPR_PAD_OK;
}
