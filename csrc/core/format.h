// The gradzip payload header and section layout. Mirrors python/gradzip/format.py and
// docs/format.md: a 64-byte little-endian header, then sections at 16-byte aligned offsets.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/macros.h"

namespace gradzip {
namespace format {

constexpr uint32_t kMagic = 0x4B505A47u;  // "GZPK" read as a little-endian uint32
constexpr uint16_t kVersion = 1;
constexpr int64_t kHeaderBytes = 64;
constexpr int64_t kAlign = 16;

constexpr uint8_t kCodecDense = 1;
constexpr uint8_t kCodecTopk = 2;

constexpr uint8_t kValueFp32 = 1;
constexpr uint8_t kValueBf16 = 2;
constexpr uint8_t kValueInt8 = 3;

constexpr uint8_t kIndexInt32 = 1;
constexpr uint8_t kIndexInt64 = 2;

constexpr uint16_t kFlagStochastic = 1;
constexpr uint16_t kFlagApproximate = 2;

constexpr int kMinBlock = 32;
constexpr int kMaxBlock = 4096;

// Byte layout of the header. Every field is little-endian; the struct is only used on
// little-endian hosts and devices (x86-64, aarch64, NVIDIA GPUs), checked below.
struct Header {
  uint32_t magic;
  uint16_t version;
  uint8_t codec;
  uint8_t bits;          // dense: 1, 2, 4, 8; top-k: 0
  uint32_t block;        // dense: block size; top-k: 0
  uint8_t value_format;  // top-k: kValue*; dense: 0
  uint8_t index_format;  // top-k: kIndex*; dense: 0
  uint16_t flags;
  uint64_t numel;
  uint64_t k;            // top-k: number of entries; dense: 0
  uint64_t total_bytes;  // the whole payload
  uint8_t reserved[24];  // zero
};
static_assert(sizeof(Header) == kHeaderBytes, "header must be 64 bytes");

GZ_HOST_DEVICE constexpr int64_t align16(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

GZ_HOST_DEVICE constexpr int64_t num_blocks(int64_t numel, int64_t block) {
  return (numel + block - 1) / block;
}

GZ_HOST_DEVICE constexpr int64_t code_bytes(int64_t numel, int bits) {
  return (numel * bits + 7) / 8;
}

// Dense: header | scales float32[nblocks] | codes.
struct DenseLayout {
  int64_t scales_offset, codes_offset, total_bytes;
};

GZ_HOST_DEVICE DenseLayout dense_layout(int64_t numel, int bits, int64_t block) {
  DenseLayout l;
  l.scales_offset = kHeaderBytes;
  l.codes_offset = l.scales_offset + align16(4 * num_blocks(numel, block));
  l.total_bytes = l.codes_offset + align16(code_bytes(numel, bits));
  return l;
}

GZ_HOST_DEVICE constexpr int index_bytes(uint8_t index_format) {
  return index_format == kIndexInt64 ? 8 : 4;
}
GZ_HOST_DEVICE constexpr int value_bytes(uint8_t value_format) {
  return value_format == kValueFp32 ? 4 : value_format == kValueBf16 ? 2 : 1;
}
GZ_HOST_DEVICE constexpr uint8_t index_format_for(int64_t numel) {
  return numel >= (int64_t(1) << 31) ? kIndexInt64 : kIndexInt32;
}

// Top-k: header | indices[k] | values[k] | (int8 values) float32 value scale.
struct TopkLayout {
  int64_t indices_offset, values_offset, scale_offset, total_bytes;  // scale_offset -1 if none
};

GZ_HOST_DEVICE TopkLayout topk_layout(int64_t numel, int64_t k, uint8_t value_format) {
  TopkLayout l;
  l.indices_offset = kHeaderBytes;
  l.values_offset = l.indices_offset + align16(k * index_bytes(index_format_for(numel)));
  int64_t end = l.values_offset + align16(k * value_bytes(value_format));
  if (value_format == kValueInt8) {
    l.scale_offset = end;
    end += kAlign;
  } else {
    l.scale_offset = -1;
  }
  l.total_bytes = end;
  return l;
}

inline Header make_dense_header(int64_t numel, int bits, int block, bool stochastic) {
  Header h;
  std::memset(&h, 0, sizeof(h));
  h.magic = kMagic;
  h.version = kVersion;
  h.codec = kCodecDense;
  h.bits = static_cast<uint8_t>(bits);
  h.block = static_cast<uint32_t>(block);
  h.flags = stochastic ? kFlagStochastic : 0;
  h.numel = static_cast<uint64_t>(numel);
  h.total_bytes = static_cast<uint64_t>(dense_layout(numel, bits, block).total_bytes);
  return h;
}

inline Header make_topk_header(int64_t numel, int64_t k, uint8_t value_format, bool approximate) {
  Header h;
  std::memset(&h, 0, sizeof(h));
  h.magic = kMagic;
  h.version = kVersion;
  h.codec = kCodecTopk;
  h.value_format = value_format;
  h.index_format = index_format_for(numel);
  h.flags = approximate ? kFlagApproximate : 0;
  h.numel = static_cast<uint64_t>(numel);
  h.k = static_cast<uint64_t>(k);
  h.total_bytes = static_cast<uint64_t>(topk_layout(numel, k, value_format).total_bytes);
  return h;
}

// Validates a header against the buffer length. Returns nullptr when valid, otherwise a
// static message naming the problem (the caller turns it into a Python ValueError).
inline const char* validate(const Header& h, int64_t length) {
  if (length < kHeaderBytes) return "truncated payload: shorter than the 64-byte header";
  if (h.magic != kMagic) return "not a gradzip payload: wrong magic";
  if (h.version != kVersion) return "unsupported gradzip payload format version";
  for (int i = 0; i < 24; ++i)
    if (h.reserved[i] != 0) return "corrupt gradzip header: reserved bytes are not zero";
  if (h.numel >= (uint64_t(1) << 62)) return "corrupt gradzip header: numel is implausibly large";
  int64_t total;
  if (h.codec == kCodecDense) {
    if (!(h.bits == 1 || h.bits == 2 || h.bits == 4 || h.bits == 8))
      return "corrupt gradzip header: dense bits not in {1, 2, 4, 8}";
    if (h.block < kMinBlock || h.block > kMaxBlock || (h.block & (h.block - 1)) != 0)
      return "corrupt gradzip header: block is not a power of two in [32, 4096]";
    if (h.value_format || h.index_format || h.k || (h.flags & ~kFlagStochastic))
      return "corrupt gradzip header: top-k fields set in a dense payload";
    total = dense_layout(int64_t(h.numel), h.bits, h.block).total_bytes;
  } else if (h.codec == kCodecTopk) {
    if (h.value_format < kValueFp32 || h.value_format > kValueInt8)
      return "corrupt gradzip header: unknown value format";
    if (h.index_format != index_format_for(int64_t(h.numel)))
      return "corrupt gradzip header: index format does not match numel";
    if (h.bits || h.block || (h.flags & ~kFlagApproximate))
      return "corrupt gradzip header: dense fields set in a top-k payload";
    if (h.k < 1 || h.k > h.numel) return "corrupt gradzip header: k outside [1, numel]";
    total = topk_layout(int64_t(h.numel), int64_t(h.k), h.value_format).total_bytes;
  } else {
    return "corrupt gradzip header: unknown codec id";
  }
  if (h.total_bytes != uint64_t(total))
    return "corrupt gradzip header: total_bytes does not match the fields";
  if (length < total) return "truncated payload: shorter than its header says";
  if (length > total) return "oversized payload: longer than its header says";
  return nullptr;
}

// Two payloads can be accumulated together when their first 40 header bytes (all fields)
// are identical.
inline bool same_codec(const Header& a, const Header& b) {
  return std::memcmp(&a, &b, 40) == 0;
}

}  // namespace format
}  // namespace gradzip
