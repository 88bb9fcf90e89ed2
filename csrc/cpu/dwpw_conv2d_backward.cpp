// Fused depthwise + pointwise convolution, backward (see dwpw_conv2d.h for the interface).
//
// Work unit: a band of output rows [b0, b1) of one image, walked in chunks of `cr` output rows (about
// one 64 KB fp32 tile of pixels x channels). Per chunk:
//   X   the input rows the chunk reads, as zero-padded fp32 channels-last rows, read from NCHW or
//       channels-last x (the one transposition an NCHW x needs); no tap needs a bounds check;
//   H   = dw(X), recomputed (the forward saved nothing); A = act(H) where g_pw is wanted;
//   GY  the chunk's gy as a contiguous fp32 panel [pixel][O] (a transposition for NCHW gy);
//   G   = (GY @ Wpw) * act'(H) by the forward's 6 x 16 micro-kernel, into a ring of output rows;
//   weight gradients over the band's own pixels: g_pw += GY^T @ A (micro-kernel), g_pwb += sum GY,
//       g_dwb += sum G, g_dw[kh][kw] += sum G * X[tap] (one kernel row's KW sums held in registers
//       over the pixels, added to memory once per chunk);
//   grad_x by GATHER: each input row whose output rows are all in the ring is written once,
//       gx[ih][iw] = sum over the taps that reach it of G[oh][ow] * w[tap]: no read-modify-write of
//       gx, no zeroing beforehand, written in x's layout and dtype.
// Bands own disjoint input rows of grad_x; a band also computes the few output rows above and below
// it that its input rows need (the halo), for grad_x only: its weight gradients come from its own
// rows. Weight gradients are summed per thread and reduced at the end.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/dwpw_kernels.h"

namespace effops::cpu::dwpw {
namespace {

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }
bool divides(int64_t b, int64_t a) { return a % b == 0; }  // exact for negative a too

struct Geometry {  // per-call sizes of the buffers
  int64_t Cv;         // channels rounded up to the vector width: vector loops run to Cv, pad channels hold zeros
  int64_t Cp;         // row stride of the fp32 channel rows (row_stride(C) >= round_up(C, 16))
  int64_t Op;         // row stride of the GY panel
  int64_t cr;         // output rows per chunk
  int64_t Wx;         // columns of an X row: input columns -PW .. (OW-1)*SW + (KW-1)*DW - PW
  int64_t RX;         // X rows of a full chunk
  int64_t RG;         // rows of the G ring
  int64_t padL, OWg;  // G ring: zero columns left of ow = 0 (taps that reach before it), row length
};

// vw: the vector width of the body that runs (1, 8 or 16; 8 for the scalar body too).
Geometry geometry(const Shape& s, int64_t vw, int64_t min_pixels = 0) {
  Geometry g;
  vw = std::max<int64_t>(vw, 8);
  g.Cv = round_up(s.C, vw);
  g.Cp = row_stride(s.C);
  g.Op = round_up(s.O, vw) + vw;  // + vw: not a power of two
  g.cr = std::min(s.OH, std::max<int64_t>(1, std::max(min_pixels, tile_pixels(g.Cp)) / s.OW));
  g.Wx = (s.OW - 1) * s.SW + (s.KW - 1) * s.DW + 1;
  g.RX = (g.cr - 1) * s.SH + (s.KH - 1) * s.DH + 1;
  // An input row not yet written needs output rows from at most `span` rows before the chunk's first.
  g.RG = g.cr + ceil_div((s.KH - 1) * s.DH, s.SH) + 1;
  const int64_t ow_min = floor_div(s.PW - (s.KW - 1) * s.DW, s.SW), ow_max = floor_div(s.W - 1 + s.PW, s.SW);
  g.padL = std::max<int64_t>(0, -ow_min);
  g.OWg = g.padL + std::max(s.OW, ow_max + 1);
  return g;
}

template <typename T>
struct Args {
  const Shape& s;
  Geometry g;
  const T* x;
  bool x_nchw;
  const T* gy;
  bool gy_nchw;
  const float* w;    // [KH*KW][Cv], zero past C
  const float* b;    // [Cv] or null
  const float* pwT;  // [ceil(C/16)][O][16]
  const uint32_t* pwT_pairs;  // null, or [ceil(C/16)][ceil(O/2)][16] bf16-pair words: the bf16 products
  T* gx;             // null: not wanted
  bool need_g;       // G is needed (grad_x, g_dw or g_dwb)
  bool need_a;       // A = act(H) is needed (g_pw with an activation)
};

struct Partials {  // one thread's sums (null: not wanted)
  float* g_dw;     // [KH*KW][Cv]
  float* g_pw;     // [O][Cp]
  float* g_dwb;    // [Cv]
  float* g_pwb;    // [Op]
};

struct Work {  // one thread's buffers, zeroed once: pad channels and pad columns stay zero
  std::vector<float> X, H, A, GY, G, row;
  std::vector<int64_t> goff;  // ring offsets of a chunk's pixels
  // The bf16 products only: the chunk's gy as bf16 rows [pixel][Op] (read as pairs over outputs), gy
  // and A as pairs over pixels ([pixel pair][Op] and [pixel pair][Cp] words).
  std::vector<c10::BFloat16> GY16;
  std::vector<uint32_t> GYT, AP;
};

#if EFFOPS_HAVE_X86
// In-register transposition of 8 x 8 floats (unpack, shuffle, 128-bit permute).
EFFOPS_AVX2_TARGET inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

// dst[j * dst_ld + k] = src[k * src_ld + j] for k < K, j < J (TS, TD: float or T; converted on the way).
// The NCHW <-> channels-last steps of the backward (x rows in, gy panel in, grad_x rows out): 8 x 8
// blocks transposed in registers on AVX2 (the scalar element-by-element loop measured ~2 cycles per
// element, the largest extra cost of NCHW over channels-last); tails element by element.
// The AVX-512 body uses the same 8 x 8 blocks (AVX2 instructions are part of its level).
template <typename V, typename TS, typename TD>
EFFOPS_INLINE void transpose(const TS* src, int64_t src_ld, int64_t K, int64_t J, TD* dst, int64_t dst_ld) {
  int64_t k0 = 0;
#if EFFOPS_HAVE_X86
  if constexpr (V::kWidth >= Avx2Vec::kWidth) {
    for (; k0 + 8 <= K; k0 += 8) {
      int64_t j0 = 0;
      for (; j0 + 8 <= J; j0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = Avx2Vec::load(src + (k0 + i) * src_ld + j0).v;
        transpose8(r);
        for (int i = 0; i < 8; ++i) Avx2Vec{r[i]}.store(dst + (j0 + i) * dst_ld + k0);
      }
      for (int64_t j = j0; j < J; ++j)
        for (int64_t k = k0; k < k0 + 8; ++k) dst[j * dst_ld + k] = from_float<TD>(to_float(src[k * src_ld + j]));
    }
  }
#endif
  for (; k0 < K; k0 += 8) {  // 8 rows at a time: each j writes 8 contiguous elements
    const int64_t kn = std::min<int64_t>(8, K - k0);
    for (int64_t j = 0; j < J; ++j)
      for (int64_t k = k0; k < k0 + kn; ++k) dst[j * dst_ld + k] = from_float<TD>(to_float(src[k * src_ld + j]));
  }
}

// X rows for input rows ih0 .. ih0 + nrows - 1 (zero outside the image), column j = input column j - PW.
template <typename V, typename T>
EFFOPS_INLINE void load_x(const Args<T>& a, int64_t n, int64_t ih0, int64_t nrows, float* X) {
  const Shape& s = a.s;
  const int64_t Wx = a.g.Wx, Cp = a.g.Cp;
  const int64_t jlo = std::min(Wx, s.PW), jhi = std::max(jlo, std::min(Wx, s.W + s.PW));
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t ih = ih0 + i;
    float* dst = X + i * Wx * Cp;
    if (ih < 0 || ih >= s.H) {
      std::fill(dst, dst + Wx * Cp, 0.f);
      continue;
    }
    std::fill(dst, dst + jlo * Cp, 0.f);
    std::fill(dst + jhi * Cp, dst + Wx * Cp, 0.f);
    if (a.x_nchw) {
      const T* src = a.x + (n * s.C * s.H + ih) * s.W + (jlo - s.PW);
      transpose<V>(src, s.H * s.W, s.C, jhi - jlo, dst + jlo * Cp, Cp);
    } else {
      for (int64_t j = jlo; j < jhi; ++j) {
        const T* src = a.x + ((n * s.H + ih) * s.W + (j - s.PW)) * s.C;
        int64_t c = 0;
        for (; c + V::kWidth <= s.C; c += V::kWidth) V::load(src + c).store(dst + j * Cp + c);
        for (; c < s.C; ++c) dst[j * Cp + c] = to_float(src[c]);
      }
    }
  }
}

// H[p] = b + sum over taps X[tap pixel] * w[tap] for the np pixels of the chunk (rows from r), A = act(H).
template <typename V, typename T>
EFFOPS_INLINE void depthwise(const Args<T>& a, const float* X, int64_t np, float* H, float* A) {
  const Shape& s = a.s;
  const int64_t Wx = a.g.Wx, Cp = a.g.Cp, Cv = a.g.Cv;
  if (s.KH == 3 && s.KW == 3) {
    // The 9 weights of one channel vector stay in registers over the chunk's pixels: one load per tap
    // and pixel instead of two.
    int64_t off[9];
    for (int64_t t = 0; t < 9; ++t) off[t] = ((t / 3) * s.DH * Wx + (t % 3) * s.DW) * Cp;
    for (int64_t c = 0; c < Cv; c += V::kWidth) {
      V w[9];
      for (int t = 0; t < 9; ++t) w[t] = V::load(a.w + t * Cv + c);
      const V b = a.b ? V::load(a.b + c) : V::zero();
      for (int64_t q = 0; q < np / s.OW; ++q) {
        const float* xr = X + q * s.SH * Wx * Cp + c;
        float* h = H + q * s.OW * Cp + c;
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const float* xp = xr + ow * s.SW * Cp;
          V acc0 = V::fma(V::load(xp + off[0]), w[0], b), acc1 = V::load(xp + off[1]) * w[1];
          for (int t = 2; t < 9; t += 2) {
            acc0 = V::fma(V::load(xp + off[t]), w[t], acc0);
            if (t + 1 < 9) acc1 = V::fma(V::load(xp + off[t + 1]), w[t + 1], acc1);
          }
          (acc0 + acc1).store(h + ow * Cp);
        }
      }
    }
    if (A)
      for (int64_t p = 0; p < np; ++p)
        for (int64_t k = 0; k < Cv; k += V::kWidth) act_forward(V::load(H + p * Cp + k), s.act).store(A + p * Cp + k);
    return;
  }
  for (int64_t p = 0; p < np; ++p) {
    const float* xb = X + ((p / s.OW) * s.SH * Wx + (p % s.OW) * s.SW) * Cp;
    float* h = H + p * Cp;
    int64_t c = 0;
    for (; c + 4 * V::kWidth <= Cv; c += 4 * V::kWidth) {
      V acc[4];
      for (int u = 0; u < 4; ++u) acc[u] = a.b ? V::load(a.b + c + u * V::kWidth) : V::zero();
      for (int64_t kh = 0; kh < s.KH; ++kh)
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const float* xp = xb + (kh * s.DH * Wx + kw * s.DW) * Cp + c;
          const float* wp = a.w + (kh * s.KW + kw) * Cv + c;
          for (int u = 0; u < 4; ++u) acc[u] = V::fma(V::load(xp + u * V::kWidth), V::load(wp + u * V::kWidth), acc[u]);
        }
      for (int u = 0; u < 4; ++u) acc[u].store(h + c + u * V::kWidth);
    }
    for (; c < Cv; c += V::kWidth) {
      V acc = a.b ? V::load(a.b + c) : V::zero();
      for (int64_t kh = 0; kh < s.KH; ++kh)
        for (int64_t kw = 0; kw < s.KW; ++kw)
          acc = V::fma(V::load(xb + (kh * s.DH * Wx + kw * s.DW) * Cp + c), V::load(a.w + (kh * s.KW + kw) * Cv + c), acc);
      acc.store(h + c);
    }
    if (A)
      for (int64_t k = 0; k < Cv; k += V::kWidth) act_forward(V::load(h + k), s.act).store(A + p * Cp + k);
  }
}

// GY[p][o] = gy of the chunk's np pixels from output row r.
template <typename V, typename T>
EFFOPS_INLINE void pack_gy(const Args<T>& a, int64_t n, int64_t r, int64_t np, float* GY) {
  const Shape& s = a.s;
  const int64_t Op = a.g.Op;
  if (a.gy_nchw) {
    transpose<V>(a.gy + n * s.O * s.OH * s.OW + r * s.OW, s.OH * s.OW, s.O, np, GY, Op);
    return;
  }
  const T* src = a.gy + (n * s.OH + r) * s.OW * s.O;
  for (int64_t p = 0; p < np; ++p) {
    int64_t o = 0;
    for (; o + V::kWidth <= s.O; o += V::kWidth) V::load(src + p * s.O + o).store(GY + p * Op + o);
    for (; o < s.O; ++o) GY[p * Op + o] = to_float(src[p * s.O + o]);
  }
}

// Row of the G ring holding output row oh.
EFFOPS_INLINE float* ring_row(const Geometry& g, float* G, int64_t oh) { return G + (oh % g.RG) * g.OWg * g.Cp; }

// Ring offset of each pixel, once per chunk: a division per pixel in the micro-kernel's epilogue
// (12 per 6 x 16 block) cost as much as a quarter of the block's FMAs at O = 128.
EFFOPS_INLINE void ring_offsets(const Geometry& g, const Shape& s, int64_t r, int64_t np, float* G, int64_t* goff) {
  for (int64_t p = 0; p < np; ++p) goff[p] = (ring_row(g, G, r + p / s.OW) - G) + (g.padL + p % s.OW) * g.Cp;
}

// G[oh][ow] = (GY @ Wpw) * act'(H) for the chunk's pixels (output rows from r), into the ring.
template <typename V, typename T>
EFFOPS_INLINE void grad_tile(const Args<T>& a, int64_t r, int64_t np, const float* GY, const float* H, float* G,
                             int64_t* goff) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  ring_offsets(g, s, r, np, G, goff);
  constexpr int MR = Blocking<V>::MR, NP = Blocking<V>::NP;
  const int64_t panels = (s.C + kNr - 1) / kNr;
  for (int64_t cb = 0; cb < panels * kNr; cb += NP * kNr) {
    const int64_t npan = std::min<int64_t>(NP, panels - cb / kNr);
    const float* wb = a.pwT + (cb / kNr) * s.O * kNr;
    for (int64_t r0 = 0; r0 < np; r0 += MR) {
      const int64_t rows = std::min<int64_t>(MR, np - r0);
      micro_rows<V>(rows, npan, GY + r0 * g.Op, g.Op, 1, wb, kNr, s.O * kNr, s.O, [&](int rr, int64_t v, V gv) {
        const int64_t p = r0 + rr;
        if (s.act != kNone) gv = gv * act_derivative(V::load(H + p * g.Cp + cb + v), s.act);
        gv.store(G + goff[p] + cb + v);
      });
    }
  }
}

#if EFFOPS_HAVE_X86
// ---- the bf16 products at the avx512_bf16 level (T = bf16, pwT_pairs given) ----
// G = GY @ Wpw and g_pw += GY^T @ A by vdpbf16ps with fp32 sums, on the operands torch's bf16
// convolution backward takes: gy (bf16 already), the weight (bf16 already) and A = act(H) rounded to
// bf16 (vcvtneps2bf16, round to nearest even, as torch's bf16 intermediate). Everything else (the
// depthwise recompute, act'(H), G, grad_x, g_dw) stays fp32 as in the fp32-FMA body.

// GY16[p][o] = gy of the chunk's np pixels from output row r, bf16 (exact: gy is bf16); pad columns stay 0.
template <typename V>
EFFOPS_INLINE void pack_gy16(const Args<c10::BFloat16>& a, int64_t n, int64_t r, int64_t np, c10::BFloat16* GY16) {
  const Shape& s = a.s;
  if (a.gy_nchw) {
    transpose<V>(a.gy + n * s.O * s.OH * s.OW + r * s.OW, s.OH * s.OW, s.O, np, GY16, a.g.Op);
    return;
  }
  const c10::BFloat16* src = a.gy + (n * s.OH + r) * s.OW * s.O;
  for (int64_t p = 0; p < np; ++p) std::copy(src + p * s.O, src + (p + 1) * s.O, GY16 + p * a.g.Op);
}

// Rows p0 .. p0 + np of `rows` (row stride ld, `cols` columns, a multiple of 16) as pairs over rows:
// out[k][j] = bf16(rows[p0 + 2k][j]) | bf16(rows[p0 + 2k + 1][j]) << 16, the row past an odd np as 0.
// From fp32 (A: rounded to nearest even) or bf16 (GY16: exact).
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE __m512i bf16_bits32(const float* p) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
}
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE __m512i bf16_bits32(const c10::BFloat16* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <typename TR>
__attribute__((noinline)) EFFOPS_AVX512_BF16_TARGET void pair_rows(const TR* rows, int64_t ld, int64_t np,
                                                                  int64_t cols, uint32_t* out, int64_t out_ld) {
  for (int64_t k = 0; 2 * k < np; ++k) {
    const TR* r0 = rows + 2 * k * ld;
    const bool two = 2 * k + 1 < np;
    for (int64_t j = 0; j < cols; j += 16) {
      const __m512i lo = bf16_bits32(r0 + j);
      const __m512i hi = two ? _mm512_slli_epi32(bf16_bits32(r0 + ld + j), 16) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + k * out_ld + j, _mm512_or_si512(lo, hi));
    }
  }
}

// rows (1..6) x np (1..4) panels of 16 fp32 sums of the vdpbf16ps product, each vector then handed to
// epi(r, column, value), as micro_rows.
template <typename V, typename Epi>
EFFOPS_INLINE void micro_dpbf16_rows_f32(int64_t rows, int64_t np, const uint32_t* a, int64_t a_rs, int64_t a_ks,
                                         const uint32_t* b, int64_t b_ks, int64_t b_ps, int64_t K2, Epi&& epi) {
  alignas(64) float out[6 * 4 * kNr];
  micro_dpbf16_f32_call(rows, np, a, a_rs, a_ks, b, b_ks, b_ps, K2, out);
  const int64_t ld = np * kNr;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < ld; v += V::kWidth) epi(static_cast<int>(r), v, V::load(out + r * ld + v));
}

// grad_tile by vdpbf16ps: G = (GY16 @ Wpw) * act'(H), pairs over outputs, 6 pixels x 4 panels of 16 channels.
template <typename V>
EFFOPS_INLINE void grad_tile_pairs(const Args<c10::BFloat16>& a, int64_t np, const c10::BFloat16* GY16,
                                   const float* H, float* G, const int64_t* goff) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  const int64_t panels = (s.C + kNr - 1) / kNr, K2 = (s.O + 1) / 2;
  const uint32_t* gw = reinterpret_cast<const uint32_t*>(GY16);
  for (int64_t pan = 0; pan < panels; pan += 4) {
    const int64_t npan = std::min<int64_t>(4, panels - pan), cb = pan * kNr;
    const uint32_t* b = a.pwT_pairs + pan * K2 * kNr;
    for (int64_t r0 = 0; r0 < np; r0 += 6)
      micro_dpbf16_rows_f32<V>(std::min<int64_t>(6, np - r0), npan, gw + r0 * g.Op / 2, g.Op / 2, 1, b, kNr, K2 * kNr,
                               K2, [&](int rr, int64_t v, V gv) {
        const int64_t p = r0 + rr;
        if (s.act != kNone) gv = gv * act_derivative(V::load(H + p * g.Cp + cb + v), s.act);
        gv.store(G + goff[p] + cb + v);
      });
  }
}

// g_pw[o][c] += sum over the pixels [p0, p0 + np) of GY16[p][o] * A[p][c] by vdpbf16ps, pairs over pixels.
template <typename V>
EFFOPS_INLINE void pw_grad_pairs(const Args<c10::BFloat16>& a, Work& wk, float* g_pw, int64_t p0, int64_t np,
                                 const float* AH) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  pair_rows(wk.GY16.data() + p0 * g.Op, g.Op, np, round_up(s.O, kNr), wk.GYT.data(), g.Op);
  pair_rows(AH + p0 * g.Cp, g.Cp, np, g.Cv, wk.AP.data(), g.Cp);
  const int64_t panels = (s.C + kNr - 1) / kNr, K2 = (np + 1) / 2;
  for (int64_t o0 = 0; o0 < s.O; o0 += 6)
    for (int64_t pan = 0; pan < panels; pan += 4)
      micro_dpbf16_rows_f32<V>(std::min<int64_t>(6, s.O - o0), std::min<int64_t>(4, panels - pan), wk.GYT.data() + o0,
                               1, g.Op, wk.AP.data() + pan * kNr, g.Cp, kNr, K2, [&](int rr, int64_t v, V acc) {
        float* dst = g_pw + (o0 + rr) * g.Cp + pan * kNr + v;
        (V::load(dst) + acc).store(dst);
      });
}
#endif

// Whether the band runs the bf16 products (only the AVX-512 body for bf16, given the pairs).
template <typename V, typename T>
constexpr bool pairs_body() {
#if EFFOPS_HAVE_X86
  return std::is_same_v<V, Avx512Vec> && std::is_same_v<T, c10::BFloat16>;
#else
  return false;
#endif
}

// g_dw[kh][0..KW) += sum over output rows [oh0, oh1) of G * X[tap] for one channel vector c: the KW
// sums stay in registers over all the pixels (X rows of the chunk start at output row r).
template <typename V, int KW, typename T>
EFFOPS_INLINE void dw_grad_row(const Args<T>& a, int64_t kh, int64_t c, int64_t r, int64_t oh0, int64_t oh1,
                               const float* X, float* G, float* out) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  V acc[KW];
  for (int k = 0; k < KW; ++k) acc[k] = V::zero();
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* gr = ring_row(g, G, oh) + g.padL * g.Cp + c;
    const float* xr = X + ((oh - r) * s.SH + kh * s.DH) * g.Wx * g.Cp + c;
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      const V gv = V::load(gr + ow * g.Cp);
      const float* xp = xr + ow * s.SW * g.Cp;
      for (int k = 0; k < KW; ++k) acc[k] = V::fma(gv, V::load(xp + k * s.DW * g.Cp), acc[k]);
    }
  }
  for (int k = 0; k < KW; ++k) (V::load(out + k * g.Cv) + acc[k]).store(out + k * g.Cv);
}

template <typename V, typename T, typename TG>
EFFOPS_INLINE void weight_grads(const Args<T>& a, Work& wk, const Partials& part, int64_t r, int64_t oh0, int64_t oh1,
                                const float* X, const float* AH, const TG* GY, float* G) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  const int64_t p0 = (oh0 - r) * s.OW, np = (oh1 - oh0) * s.OW;
  if (part.g_pwb)
    for (int64_t o = 0; o < g.Op - std::max<int64_t>(8, V::kWidth); o += V::kWidth) {
      V acc = V::zero();
      for (int64_t p = p0; p < p0 + np; ++p) acc = acc + V::load(GY + p * g.Op + o);
      (V::load(part.g_pwb + o) + acc).store(part.g_pwb + o);
    }
  bool pw_done = false;
  if constexpr (pairs_body<V, T>()) {
    if (part.g_pw && a.pwT_pairs) {
      pw_grad_pairs<V>(a, wk, part.g_pw, p0, np, AH);
      pw_done = true;
    }
  }
  if (part.g_pw && !pw_done) {
    // g_pw[o][c] += sum_p GY[p][o] * A[p][c]: rows are outputs, the reduction runs over the pixels.
    constexpr int MR = Blocking<V>::MR, NP = Blocking<V>::NP;
    const int64_t panels = (s.C + kNr - 1) / kNr;
    for (int64_t o0 = 0; o0 < s.O; o0 += MR) {
      const int64_t rows = std::min<int64_t>(MR, s.O - o0);
      for (int64_t cb = 0; cb < panels * kNr; cb += NP * kNr)
        micro_rows<V>(rows, std::min<int64_t>(NP, panels - cb / kNr), GY + p0 * g.Op + o0, 1, g.Op,
                      AH + p0 * g.Cp + cb, g.Cp, kNr, np, [&](int rr, int64_t v, V acc) {
          float* dst = part.g_pw + (o0 + rr) * g.Cp + cb + v;
          (V::load(dst) + acc).store(dst);
        });
    }
  }
  for (int64_t c = 0; c < g.Cv; c += V::kWidth) {
    if (part.g_dwb) {
      V acc = V::zero();
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const float* gr = ring_row(g, G, oh) + g.padL * g.Cp + c;
        for (int64_t ow = 0; ow < s.OW; ++ow) acc = acc + V::load(gr + ow * g.Cp);
      }
      (V::load(part.g_dwb + c) + acc).store(part.g_dwb + c);
    }
    if (!part.g_dw) continue;
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      float* out = part.g_dw + kh * s.KW * g.Cv + c;
      switch (s.KW) {
        case 1: dw_grad_row<V, 1>(a, kh, c, r, oh0, oh1, X, G, out); break;
        case 2: dw_grad_row<V, 2>(a, kh, c, r, oh0, oh1, X, G, out); break;
        case 3: dw_grad_row<V, 3>(a, kh, c, r, oh0, oh1, X, G, out); break;
        case 4: dw_grad_row<V, 4>(a, kh, c, r, oh0, oh1, X, G, out); break;
        case 5: dw_grad_row<V, 5>(a, kh, c, r, oh0, oh1, X, G, out); break;
        case 6: dw_grad_row<V, 6>(a, kh, c, r, oh0, oh1, X, G, out); break;
        case 7: dw_grad_row<V, 7>(a, kh, c, r, oh0, oh1, X, G, out); break;
        default: dw_grad_row<V, 8>(a, kh, c, r, oh0, oh1, X, G, out); break;
      }
    }
  }
}

// grad_x of input row ih, gathered from the G ring: gx[ih][iw] = sum over the taps (kh, kw) that reach
// it, G[oh][ow] * w[kh][kw] with oh = (ih + PH - kh*DH) / SH, ow = (iw + PW - kw*DW) / SW (exact
// divisions only). Input columns of one stride phase share their tap set; the ring's zero pad columns
// stand for ow outside [0, OW). Computed into `row` ([W][Cp] fp32), then stored in x's layout.
template <typename V, typename T>
EFFOPS_INLINE void grad_x_row(const Args<T>& a, int64_t n, int64_t ih, float* G, float* row) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  const float* grow[8];
  int64_t khs[8], nk = 0;
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    const int64_t t = ih + s.PH - kh * s.DH;
    if (!divides(s.SH, t) || t < 0 || t / s.SH >= s.OH) continue;
    grow[nk] = ring_row(g, G, t / s.SH);
    khs[nk++] = kh;
  }
  for (int64_t ph = 0; ph < std::min(s.SW, s.W); ++ph) {
    const float* gp[64];
    const float* wp[64];
    int64_t nt = 0;
    for (int64_t i = 0; i < nk; ++i)
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        const int64_t u = ph + s.PW - kw * s.DW;
        if (!divides(s.SW, u)) continue;
        gp[nt] = grow[i] + (g.padL + u / s.SW) * g.Cp;
        wp[nt++] = a.w + (khs[i] * s.KW + kw) * g.Cv;
      }
    if (nt == 9 && s.SW == 1) {
      // 3x3, stride 1 (every column has all taps): a channel vector's 9 weights stay in registers.
      for (int64_t c = 0; c < g.Cv; c += V::kWidth) {
        V w[9];
        for (int t = 0; t < 9; ++t) w[t] = V::load(wp[t] + c);
        for (int64_t iw = 0; iw < s.W; ++iw) {
          const int64_t mo = iw * g.Cp + c;
          V acc0 = V::load(gp[0] + mo) * w[0], acc1 = V::load(gp[1] + mo) * w[1];
          for (int t = 2; t < 9; t += 2) {
            acc0 = V::fma(V::load(gp[t] + mo), w[t], acc0);
            if (t + 1 < 9) acc1 = V::fma(V::load(gp[t + 1] + mo), w[t + 1], acc1);
          }
          (acc0 + acc1).store(row + mo);
        }
      }
      continue;
    }
    for (int64_t iw = ph, m = 0; iw < s.W; iw += s.SW, ++m) {
      float* out = row + iw * g.Cp;
      const int64_t mo = m * g.Cp;
      int64_t c = 0;
      for (; c + 4 * V::kWidth <= g.Cv; c += 4 * V::kWidth) {
        V acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
        for (int64_t t = 0; t < nt; ++t)
          for (int u = 0; u < 4; ++u)
            acc[u] = V::fma(V::load(gp[t] + mo + c + u * V::kWidth), V::load(wp[t] + c + u * V::kWidth), acc[u]);
        for (int u = 0; u < 4; ++u) acc[u].store(out + c + u * V::kWidth);
      }
      for (; c < g.Cv; c += V::kWidth) {
        V acc = V::zero();
        for (int64_t t = 0; t < nt; ++t) acc = V::fma(V::load(gp[t] + mo + c), V::load(wp[t] + c), acc);
        acc.store(out + c);
      }
    }
  }
  if (a.x_nchw) {
    // gx[c][ih][iw] = row[iw][c]
    transpose<V>(row, g.Cp, s.W, s.C, a.gx + (n * s.C * s.H + ih) * s.W, s.H * s.W);
    return;
  }
  T* dst = a.gx + (n * s.H + ih) * s.W * s.C;
  for (int64_t iw = 0; iw < s.W; ++iw) {
    int64_t c = 0;
    for (; c + V::kWidth <= s.C; c += V::kWidth) V::load(row + iw * g.Cp + c).store(dst + iw * s.C + c);
    for (; c < s.C; ++c) dst[iw * s.C + c] = from_float<T>(row[iw * g.Cp + c]);
  }
}

// One band [b0, b1) of output rows of image n (see the file comment).
template <typename V, typename T>
EFFOPS_INLINE void backward_band(const Args<T>& a, Work& wk, const Partials& part, int64_t n, int64_t b0, int64_t b1) {
  const Shape& s = a.s;
  const Geometry& g = a.g;
  // Input rows [lo, hi) of grad_x belong to this band; the output rows they need widen [b0, b1).
  int64_t lo = 0, hi = 0, r_begin = b0, r_end = b1;
  if (a.gx) {
    lo = b0 == 0 ? 0 : std::clamp<int64_t>(b0 * s.SH - s.PH, 0, s.H);
    hi = b1 == s.OH ? s.H : std::clamp<int64_t>(b1 * s.SH - s.PH, 0, s.H);
    if (hi > lo) {
      r_begin = std::min(b0, std::max<int64_t>(0, ceil_div(lo + s.PH - (s.KH - 1) * s.DH, s.SH)));
      r_end = std::max(b1, std::min(s.OH, floor_div(hi - 1 + s.PH, s.SH) + 1));
    }
  }
  float* X = wk.X.data();
  float* H = wk.H.data();
  float* G = wk.G.data();
  int64_t next = lo;  // next input row of grad_x to write
  for (int64_t r = r_begin; r < r_end; r += g.cr) {
    const int64_t rows = std::min(g.cr, r_end - r), np = rows * s.OW;
    const int64_t own0 = std::clamp(b0, r, r + rows), own1 = std::clamp(b1, r, r + rows);
    const bool own = own1 > own0;
    load_x<V>(a, n, r * s.SH - s.PH, (rows - 1) * s.SH + (s.KH - 1) * s.DH + 1, X);
    float* A = own && a.need_a ? wk.A.data() : nullptr;
    depthwise<V>(a, X, np, H, A);
    const float* AH = a.need_a ? wk.A.data() : H;
    bool done_pairs = false;
    if constexpr (pairs_body<V, T>()) {
      if (a.pwT_pairs) {
        pack_gy16<V>(a, n, r, np, wk.GY16.data());
        if (a.need_g) {
          ring_offsets(g, s, r, np, G, wk.goff.data());
          grad_tile_pairs<V>(a, np, wk.GY16.data(), H, G, wk.goff.data());
        }
        if (own) weight_grads<V>(a, wk, part, r, own0, own1, X, AH, wk.GY16.data(), G);
        done_pairs = true;
      }
    }
    if (!done_pairs) {
      pack_gy<V>(a, n, r, np, wk.GY.data());
      if (a.need_g) grad_tile<V>(a, r, np, wk.GY.data(), H, G, wk.goff.data());
      if (own) weight_grads<V>(a, wk, part, r, own0, own1, X, AH, wk.GY.data(), G);
    }
    if (!a.gx) continue;
    const int64_t done = r + rows;  // output rows < done are in the ring
    for (; next < hi; ++next) {
      const int64_t last = std::min(s.OH - 1, floor_div(next + s.PH, s.SH));  // last output row it needs
      if (last >= done && done < r_end) break;
      grad_x_row<V>(a, n, next, G, wk.row.data());
    }
  }
}

template <typename T>
EFFOPS_FLATTEN void backward_band_scalar(const Args<T>& a, Work& wk, const Partials& part, int64_t n, int64_t b0,
                                         int64_t b1) {
  backward_band<ScalarVec>(a, wk, part, n, b0, b1);
}

#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void backward_band_avx2(const Args<T>& a, Work& wk, const Partials& part, int64_t n,
                                                          int64_t b0, int64_t b1) {
  backward_band<Avx2Vec>(a, wk, part, n, b0, b1);
}
template <typename T>
EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void backward_band_avx512(const Args<T>& a, Work& wk, const Partials& part,
                                                              int64_t n, int64_t b0, int64_t b1) {
  backward_band<Avx512Vec>(a, wk, part, n, b0, b1);
}
#endif

}  // namespace

bool backward_takes_bf16_pairs() {
#if EFFOPS_HAVE_X86
  return cpu_isa_at_least(CpuIsa::kAvx512Bf16);
#else
  return false;
#endif
}

template <typename T>
void backward(const Shape& s, const T* x, bool x_nchw, const T* gy, bool gy_nchw, const float* dw_w,
              const float* dw_b, const float* pw_packed_t, T* gx, float* g_dw, float* g_pw, float* g_dwb,
              float* g_pwb, const uint32_t* pw_pairs_t) {
  const bool avx2 = use_avx2(), avx512 = use_avx512();
  // The pairs run the vdpbf16ps products: bf16 only, and only where the CPU has them (the caller asked
  // backward_takes_bf16_pairs at the level then in force; see forward()).
  if (!std::is_same_v<T, c10::BFloat16> || !avx512 ||
      static_cast<int>(detected_cpu_isa()) < static_cast<int>(CpuIsa::kAvx512Bf16))
    pw_pairs_t = nullptr;
  // With the bf16 products, chunks of at least 96 pixels: the pixel pairs are the reduction of the g_pw
  // product, and at 512 channels one fp32 tile holds 24 pixels (12 pairs a call, its epilogue as long as
  // its loop). The backward alone, one thread: 8 x 512 -> 512 @7 2.2-2.4 against 2.3-2.7 ms, 256 @14
  // 1.33-1.40 against 1.44-1.52 ms; 64 -> 128 @56 (192 pixels a tile already) unchanged.
  const Geometry g = geometry(s, avx512 ? 16 : 8, pw_pairs_t ? 96 : 0);
  const int64_t taps = s.KH * s.KW;
  // The depthwise weights and bias padded to Cv channels (zeros), so channel vectors need no tail.
  std::vector<float> w(taps * g.Cv, 0.f), b(dw_b ? g.Cv : 0, 0.f);
  for (int64_t t = 0; t < taps; ++t) std::copy(dw_w + t * s.C, dw_w + (t + 1) * s.C, w.begin() + t * g.Cv);
  if (dw_b) std::copy(dw_b, dw_b + s.C, b.begin());
  const Args<T> a{s, g, x, x_nchw, gy, gy_nchw, w.data(), dw_b ? b.data() : nullptr, pw_packed_t, pw_pairs_t, gx,
                  gx || g_dw || g_dwb, g_pw && s.act != kNone};
  // Bands per image: enough tasks for the threads when the batch is small. A band with grad_x
  // recomputes its halo rows, so those bands stay at least 2 chunks tall.
  const int threads = at::get_num_threads();
  const int64_t max_bands = std::max<int64_t>(1, s.OH / (gx ? 2 * g.cr : g.cr));
  const int64_t nb = std::clamp<int64_t>(ceil_div((gx ? 2 : 4) * threads, s.N), 1, max_bands);
  const int64_t n_dw = g_dw ? taps * g.Cv : 0, n_pw = g_pw ? s.O * g.Cp : 0, n_dwb = g_dwb ? g.Cv : 0,
                n_pwb = g_pwb ? g.Op : 0, per = n_dw + n_pw + n_dwb + n_pwb;
  std::vector<float> sums(threads * per, 0.f);
  auto partials = [&](int t) {
    float* base = sums.data() + t * per;
    return Partials{g_dw ? base : nullptr, g_pw ? base + n_dw : nullptr, g_dwb ? base + n_dw + n_pw : nullptr,
                    g_pwb ? base + n_dw + n_pw + n_dwb : nullptr};
  };
  at::parallel_for(0, s.N * nb, 1, [&](int64_t begin, int64_t end) {
    const Partials part = partials(at::get_thread_num());
    const int64_t np = g.cr * s.OW;
    Work wk{std::vector<float>(g.RX * g.Wx * g.Cp, 0.f), std::vector<float>(np * g.Cp, 0.f),
            std::vector<float>(a.need_a ? np * g.Cp : 0, 0.f), std::vector<float>(np * g.Op, 0.f),
            std::vector<float>(a.need_g ? g.RG * g.OWg * g.Cp : 0, 0.f),
            std::vector<float>(gx ? s.W * g.Cp : 0, 0.f), std::vector<int64_t>(np),
            std::vector<c10::BFloat16>(pw_pairs_t ? np * g.Op : 0, c10::BFloat16(0.f)),
            std::vector<uint32_t>(pw_pairs_t && g_pw ? (np + 1) / 2 * g.Op : 0, 0u),
            std::vector<uint32_t>(pw_pairs_t && g_pw ? (np + 1) / 2 * g.Cp : 0, 0u)};
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / nb, k = i % nb, b0 = k * s.OH / nb, b1 = (k + 1) * s.OH / nb;
#if EFFOPS_HAVE_X86
      if (avx512) {
        backward_band_avx512<T>(a, wk, part, n, b0, b1);
        continue;
      }
      if (avx2) {
        backward_band_avx2<T>(a, wk, part, n, b0, b1);
        continue;
      }
#endif
      backward_band_scalar<T>(a, wk, part, n, b0, b1);
    }
  });
  for (int t = 0; t < threads; ++t) {
    const Partials part = partials(t);
    for (int64_t k = 0; k < (g_dw ? taps : 0); ++k)
      for (int64_t c = 0; c < s.C; ++c) g_dw[k * s.C + c] = (t ? g_dw[k * s.C + c] : 0.f) + part.g_dw[k * g.Cv + c];
    for (int64_t o = 0; o < (g_pw ? s.O : 0); ++o)
      for (int64_t c = 0; c < s.C; ++c) g_pw[o * s.C + c] = (t ? g_pw[o * s.C + c] : 0.f) + part.g_pw[o * g.Cp + c];
    for (int64_t c = 0; c < (g_dwb ? s.C : 0); ++c) g_dwb[c] = (t ? g_dwb[c] : 0.f) + part.g_dwb[c];
    for (int64_t o = 0; o < (g_pwb ? s.O : 0); ++o) g_pwb[o] = (t ? g_pwb[o] : 0.f) + part.g_pwb[o];
  }
}

#define EFFOPS_INSTANTIATE(T)                                                                                  \
  template void backward<T>(const Shape&, const T*, bool, const T*, bool, const float*, const float*, const float*, \
                            T*, float*, float*, float*, float*, const uint32_t*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)

}  // namespace effops::cpu::dwpw
