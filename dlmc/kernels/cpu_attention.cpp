// dlmc_cpu::attention: bf16 attention on x86 CPUs with AVX512-BF16, its products on the bf16 dot-product
// unit (VDPBF16PS: bf16 pairs multiplied exactly, summed in fp32), as a GEMM library would run them.
//
// Why: ATen's CPU flash attention runs its bf16 products outside oneDNN, at 30-160 GFLOP/s on these CPUs
// against ~900 for a bf16 GEMM; at 512 x 512 it is a third of a bf16 step. The maths is the flash
// kernel's: scores q.k in fp32, scaled, masked, softmax in fp32 (exp(s - max) rounded to bf16 for the
// P.V product, as the flash kernel rounds it), P.V summed in fp32 and divided by the row's sum, rounded to
// bf16 once. Rows are whole (no online rescaling): a task holds one tile of queries' scores for every key.
//
// Layout: query [B, H, Lq, D], key and value [B, Hk, Lk, D] (H a multiple of Hk: grouped queries share
// a K/V head), mask bool broadcastable to [B, H, Lq, Lk] (True = may attend) or none; any strides with
// the last dim contiguous. Output [B, H, Lq, D] bf16, contiguous. A fully masked query row gives zeros.
//
// Compiled at first use by dlmc/kernels/cpu_attention.py (torch.utils.cpp_extension) for CPUs that
// have AVX512-F/BW/VL/DQ and AVX512-BF16; never loaded elsewhere.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kRows = 4;   // query rows per micro-tile: 4 x 4 zmm accumulators
constexpr int64_t kCols = 64;  // columns per micro-tile (keys for q.k, head dims for p.v): 4 zmm of 16 fp32
constexpr int64_t kTile = 32;  // query rows per task

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline void store_bf16(uint16_t* p, __m512 x) {  // 16 values, rounded to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// Which of the 16 key columns from j count for a query row: real keys (j < Lk) the mask row m allows.
inline __mmask16 allowed_at(const bool* m, int64_t j, int64_t Lk) {
  __mmask16 a = j + 16 <= Lk ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(Lk - j, 0)) - 1);
  if (m) a = _mm_mask_cmpneq_epi8_mask(a, _mm_maskz_loadu_epi8(a, m + j), _mm_setzero_si128());
  return a;
}

inline uint32_t pair_at(const uint16_t* p) {  // two adjacent bf16 as one 32-bit lane
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// e^x for x <= 0 (scores minus their row max): n = round(x log2 e), r = x - n ln 2, e^r by its degree-5
// Taylor polynomial (|r| <= 0.35: relative error < 3e-6, far below the bf16 rounding the probabilities
// get for P.V), scaled by 2^n.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 120);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// c[r][0:64] = sum over pairs t of a[r] pair t . b[t][0:64]: a rows of `pairs` bf16 pairs (row stride
// a_stride in bf16), b packed as pairs [pairs][b_stride / 2][2] (VNNI), `rows` <= kRows.
template <int64_t R>
inline void micro(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t b_stride, int64_t pairs,
                  __m512 (&c)[kRows][4]) {
  __m512 acc[R][4];  // local, so the compiler keeps them in registers (c is written once, at the end)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    const uint16_t* bt = b + t * b_stride;
    const __m512i b0 = _mm512_loadu_si512(bt), b1 = _mm512_loadu_si512(bt + 32);
    const __m512i b2 = _mm512_loadu_si512(bt + 64), b3 = _mm512_loadu_si512(bt + 96);
    for (int64_t r = 0; r < R; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(pair_at(a + r * a_stride + 2 * t)));
      acc[r][0] = dot(acc[r][0], ar, b0);
      acc[r][1] = dot(acc[r][1], ar, b1);
      acc[r][2] = dot(acc[r][2], ar, b2);
      acc[r][3] = dot(acc[r][3], ar, b3);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < 4; ++v) c[r][v] = acc[r][v];
}

inline void micro_rows(int64_t rows, const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t b_stride,
                       int64_t pairs, __m512 (&c)[kRows][4]) {
  switch (rows) {
    case 4: return micro<4>(a, a_stride, b, b_stride, pairs, c);
    case 3: return micro<3>(a, a_stride, b, b_stride, pairs, c);
    case 2: return micro<2>(a, a_stride, b, b_stride, pairs, c);
    default: return micro<1>(a, a_stride, b, b_stride, pairs, c);
  }
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& mask_opt, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16,
              "dlmc_cpu::attention: query, key and value must be bfloat16");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "dlmc_cpu::attention: 4-d inputs");
  const int64_t B = query.size(0), H = query.size(1), Lq = query.size(2), D = query.size(3);
  const int64_t Hk = key.size(1), Lk = key.size(2);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && value.size(1) == Hk && value.size(2) == Lk &&
                  key.size(3) == D && value.size(3) == D && Hk > 0 && H % Hk == 0,
              "dlmc_cpu::attention: shapes do not match");
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  at::Tensor mask;
  if (mask_opt.has_value()) {
    TORCH_CHECK(mask_opt->scalar_type() == at::kBool, "dlmc_cpu::attention: the mask must be bool");
    mask = mask_opt->expand({B, H, Lq, Lk});
    if (mask.stride(3) != 1) mask = mask.contiguous();
  }
  auto out = at::empty({B, H, Lq, D}, query.options());
  if (Lq == 0 || B == 0 || H == 0) return out;

  const int64_t pairs_d = round_up(D, 2) / 2;  // q.k reduces over head-dim pairs
  const int64_t keys = round_up(std::max<int64_t>(Lk, 1), kCols);  // key columns, padded
  const int64_t pairs_k = keys / 2;  // p.v reduces over key pairs
  const int64_t dims = round_up(D, kCols);  // head-dim columns of p.v, padded
  const int64_t group = H / Hk;

  // Pack every K/V head once: kp [Hk-head][pairs_d][keys][2], vp [Hk-head][pairs_k][dims][2]. Uninitialised
  // (zeroing them whole each call cost more than the packing): every slot is written, padding with zeros.
  std::unique_ptr<uint16_t[]> kp(new uint16_t[B * Hk * pairs_d * keys * 2]);
  std::unique_ptr<uint16_t[]> vp(new uint16_t[B * Hk * pairs_k * dims * 2]);
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const bool gather = (Lk + 16) * k.stride(2) + D < (int64_t(1) << 31);  // offsets fit the gather's int32
  at::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hk, h = bh % Hk;
      const uint16_t* kh = kd + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vh = vd + b * v.stride(0) + h * v.stride(1);
      uint16_t* kph = kp.get() + bh * pairs_d * keys * 2;
      uint16_t* vph = vp.get() + bh * pairs_k * dims * 2;
      // K: the pair of head dims (2t, 2t + 1) of key j goes to slot [t][j], 16 keys per gather
      const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(static_cast<int>(k.stride(2))));
      for (int64_t t = 0; t < pairs_d; ++t) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(kph) + t * keys;
        const bool whole = 2 * t + 1 < D;  // an odd head dim's last pair is (value, 0)
        for (int64_t j = 0; j < keys; j += 16) {
          const int64_t n = std::clamp<int64_t>(Lk - j, 0, 16);
          if (gather && whole) {
            const __mmask16 real = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
            const __m512i at = _mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(j * k.stride(2) + 2 * t)));
            _mm512_storeu_si512(dst + j, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, at, kh, 2));
            continue;
          }
          for (int64_t l = 0; l < 16; ++l) {
            const uint16_t* src = kh + (j + l) * k.stride(2) + 2 * t;
            dst[j + l] = l < n ? uint32_t(src[0]) | (whole ? uint32_t(src[1]) << 16 : 0u) : 0u;
          }
        }
      }
      // V: keys 2t and 2t + 1 interleaved per head dim, 32 dims at a time; zeros past D and past Lk
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      for (int64_t t = 0; t < pairs_k; ++t) {
        uint16_t* dst = vph + t * dims * 2;
        if (2 * t >= Lk) {
          std::fill(dst, dst + dims * 2, 0);
          continue;
        }
        const uint16_t* even = vh + 2 * t * v.stride(2);
        const uint16_t* odd = 2 * t + 1 < Lk ? even + v.stride(2) : nullptr;  // none past the last key
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
          const __m512i a = _mm512_loadu_si512(even + d);
          const __m512i b = odd ? _mm512_loadu_si512(odd + d) : _mm512_setzero_si512();
          _mm512_storeu_si512(dst + 2 * d, _mm512_permutex2var_epi16(a, lo, b));
          _mm512_storeu_si512(dst + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
        for (; d < D; ++d) {
          dst[2 * d] = even[d];
          dst[2 * d + 1] = odd ? odd[d] : 0;
        }
        std::fill(dst + 2 * D, dst + dims * 2, 0);
      }
    }
  });

  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const bool* md = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t tiles = (Lq + kTile - 1) / kTile;
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> qt(kTile * pairs_d * 2);  // the tile's queries, head dim padded to pairs
    std::vector<float> scores(kTile * keys);
    std::vector<uint16_t> probs(kTile * keys);  // exp(s - max) in bf16, zero where masked or padding
    std::vector<float> sums(kTile);
    std::vector<__mmask16> allowed(keys / 16);  // per row: which of 16 columns count
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * tiles), h = (task / tiles) % H, i0 = (task % tiles) * kTile;
      const int64_t rows = std::min(kTile, Lq - i0);
      const int64_t kv = b * Hk + h / group;
      const uint16_t* kph = kp.get() + kv * pairs_d * keys * 2;
      const uint16_t* vph = vp.get() + kv * pairs_k * dims * 2;
      std::fill(qt.begin(), qt.end(), 0);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(&qt[r * pairs_d * 2], qd + b * q.stride(0) + h * q.stride(1) + (i0 + r) * q.stride(2), D * 2);

      // scores = scale * q.k over every key column (padding columns included, masked below)
      for (int64_t j0 = 0; j0 < keys; j0 += kCols)
        for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
          const int64_t n = std::min(kRows, rows - r0);
          __m512 c[kRows][4];
          micro_rows(n, &qt[r0 * pairs_d * 2], pairs_d * 2, kph + j0 * 2, keys * 2, pairs_d, c);
          for (int64_t r = 0; r < n; ++r)
            for (int64_t w = 0; w < 4; ++w)
              _mm512_storeu_ps(&scores[(r0 + r) * keys + j0 + 16 * w], _mm512_mul_ps(c[r][w], _mm512_set1_ps(scale_f)));
        }

      // softmax numerators per row: which keys count (mask, real columns), their max, exp, sum
      for (int64_t r = 0; r < rows; ++r) {
        float* s = &scores[r * keys];
        const bool* m = md ? md + b * mask.stride(0) + h * mask.stride(1) + (i0 + r) * mask.stride(2) : nullptr;
        // two independent chains (max, then sum) over 32 columns per trip: keys is a multiple of 64
        __m512 best0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), best1 = best0;
        for (int64_t j = 0; j < keys; j += 32) {
          const __mmask16 a0 = allowed_at(m, j, Lk), a1 = allowed_at(m, j + 16, Lk);
          allowed[j / 16] = a0;
          allowed[j / 16 + 1] = a1;
          best0 = _mm512_mask_max_ps(best0, a0, best0, _mm512_loadu_ps(s + j));
          best1 = _mm512_mask_max_ps(best1, a1, best1, _mm512_loadu_ps(s + j + 16));
        }
        const float top = _mm512_reduce_max_ps(_mm512_max_ps(best0, best1));
        uint16_t* p = &probs[r * keys];
        if (top == -std::numeric_limits<float>::infinity()) {  // no key allowed: the row's output is zero
          std::fill(p, p + keys, 0);
          sums[r] = 0.0f;
          continue;
        }
        __m512 total0 = _mm512_setzero_ps(), total1 = _mm512_setzero_ps();
        const __m512 shift = _mm512_set1_ps(top);
        for (int64_t j = 0; j < keys; j += 32) {
          const __m512 e0 = _mm512_maskz_mov_ps(allowed[j / 16],
                                                exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift)));
          const __m512 e1 = _mm512_maskz_mov_ps(allowed[j / 16 + 1],
                                                exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), shift)));
          store_bf16(p + j, e0);  // P.V reads the probabilities in bf16, as the flash kernel does
          store_bf16(p + j + 16, e1);
          total0 = _mm512_add_ps(total0, e0);  // the sum of the fp32 values, as the flash kernel sums them
          total1 = _mm512_add_ps(total1, e1);
        }
        sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(total0, total1));
      }

      // out = (p.v) / sum, rounded to bf16 once
      for (int64_t d0 = 0; d0 < dims; d0 += kCols)
        for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
          const int64_t n = std::min(kRows, rows - r0);
          __m512 c[kRows][4];
          micro_rows(n, &probs[r0 * keys], keys, vph + d0 * 2, dims * 2, pairs_k, c);
          for (int64_t r = 0; r < n; ++r) {
            const float inv = sums[r0 + r] > 0.0f ? 1.0f / sums[r0 + r] : 0.0f;
            uint16_t* o = od + ((b * H + h) * Lq + i0 + r0 + r) * D;
            for (int64_t w = 0; w < 4 && d0 + 16 * w < D; ++w) {
              const __m512 x = _mm512_mul_ps(c[r][w], _mm512_set1_ps(inv));
              const int64_t left = D - d0 - 16 * w;  // the head dim's last columns: a partial store
              const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
              _mm256_mask_storeu_epi16(o + d0 + 16 * w, keep, (__m256i)_mm512_cvtneps_pbh(x));
            }
          }
        }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dlmc_cpu, CPU, m) { m.impl("attention", &attention); }
