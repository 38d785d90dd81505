// The fused CPU kernel of the fingerprint accumulator (see accumulator_kernel.h).
//
// Per row, sweep 1 reads the teacher and reference rows from memory once, in one loop: e =
// 2^((x - m) log2(e) / tau) with m a running shift (a logit already seen; a chunk whose maximum
// exceeds it by too much is redone from L1), into per-thread float row buffers, and per chunk the
// sum of e. The row's log-sum-exp follows in float64
// from the chunk sums. Sweep 2 walks a block of 2-4 rows chunk by chunk, re-reading their logits
// from cache (recomputing delta rather than storing it) and the e buffers: for each vocabulary slot
// it loads the float64 sums once, adds the block's rows and stores once. Rows are split into
// contiguous ranges, one per thread, each with its own partial sums, added in a fixed order.
//
// Cost (measured on a 2-core AMD EPYC, AVX2, one thread): the two exps per element pair alone take
// about 0.7 ns per pair from L1, more than reading the pair from memory (a plain sum: 0.3-0.5 ns),
// so the kernel is compute bound; see bench/bench_fingerprint.py.
//
// Precision: p = e * 2^(m log2(e) / tau - log2 Z) with a float exp2 (degree-5 polynomial, ~2e-7
// relative); delta = dx / tau - (lse_T - lse_R) in float (a few float roundings); each row's terms
// are widened to float64 on their own, so results do not depend on how rows are grouped into
// blocks, threads or shards beyond float64 rounding. All sums over positions are float64. Rows
// whose logits are too large for the float exponent arithmetic run through the float64 loop.
#include "accumulator_kernel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

namespace libtransfer::fingerprint::detail {

namespace {

// Elements per vocabulary chunk (a multiple of kGroup): a chunk of both rows stays in L1 when
// sweep 1 has to redo it with a higher shift; sweep 2 sums a row's KL terms in float lanes over a
// chunk (64 terms per lane) before they move to float64.
constexpr int64_t kChunk = 512;
// Elements whose exp sum is kept in float lanes (8 terms per lane) before moving to float64: the
// log-sum-exp, which shifts every delta of the row, stays accurate to about 1e-7.
constexpr int64_t kGroup = 64;
// Most rows per sweep-2 block: each float64 [V] sum is loaded and stored once per block.
constexpr int64_t kMaxRowsPerBlock = 4;
// Bytes of a block's working set (its logits rows and float exp buffers) up to which a block takes
// kMaxRowsPerBlock rows (else 2): about 1.5 x the 1 MiB L2 of the machine this was tuned on; for
// V = 128k a 4-row block (3-4 MB) would spill to L3 on every re-read (measured slower).
constexpr int64_t kBlockBytes = int64_t{3} << 19;
// Scored rows per thread below which splitting across threads costs more than it saves.
constexpr int64_t kMinRowsPerThread = 4;
// Scored logits (pairs) per thread below which starting a thread (~20 us) is not worth it: about
// 0.3 ms of work at 1.5 ns per pair.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 18;
// A subset's probability mass below this (float) is recomputed in float64 from the logits, since
// the float exp buffers lose precision near float underflow.
constexpr double kSubsetMassFloatFloor = 1e-30;
constexpr double kLog2e = 1.44269504088896340736;
// Sweep 1 keeps e = 2^((x - shift) / tau * log2(e)) at or below 2^this (sums of a chunk stay far
// from the float range).
constexpr double kExpHeadroom = 64.0;
constexpr double kLn2 = 0.693147180559945309417;

int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// Rows per sweep-2 block for this vocabulary and input element size.
int64_t rows_per_block(int64_t vocab, size_t element_bytes) {
  const int64_t row_bytes = vocab * static_cast<int64_t>(2 * element_bytes + 2 * sizeof(float));
  return kMaxRowsPerBlock * row_bytes <= kBlockBytes ? kMaxRowsPerBlock : 2;
}

template <typename In>
double to_double(In value) {
  return static_cast<double>(static_cast<float>(value));
}
template <>
double to_double<double>(double value) {
  return value;
}
template <typename In>
float to_float(In value) {
  return static_cast<float>(value);
}

// --- Sequence runs -------------------------------------------------------------------------------

void add_to_runs(std::vector<SequenceRun>& runs, int64_t id, const std::vector<double>& f,
                 bool keep_sums) {
  if (runs.empty() || runs.back().id != id) {
    SequenceRun run;
    run.id = id;
    if (keep_sums) run.sum.assign(f.size(), 0.0);
    runs.push_back(std::move(run));
  }
  SequenceRun& run = runs.back();
  ++run.count;
  if (keep_sums) {
    for (size_t i = 0; i < f.size(); ++i) run.sum[i] += f[i];
  }
}

// --- The subset statistics of one row, in float64 from the logits --------------------------------

// lse_S of l = x / tau - lse over the subset.
template <typename In>
double subset_logsumexp(const In* x, const std::vector<int64_t>& subset, double inv_tau,
                        double lse) {
  double m = -std::numeric_limits<double>::infinity();
  for (const int64_t s : subset) m = std::max(m, to_double(x[s]) * inv_tau);
  double sum = 0.0;
  for (const int64_t s : subset) sum += std::exp(to_double(x[s]) * inv_tau - m);
  return m + std::log(sum) - lse;
}

// F_c = delta[S] - mean delta[S] into f, added to the thread's sums; returns nothing.
template <typename In>
void add_centered(const In* t, const In* r, const std::vector<int64_t>& subset, double inv_tau,
                  double lse_diff, std::vector<double>& f, PartialSums& out) {
  const size_t n = subset.size();
  double mean = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = subset[i];
    f[i] = (to_double(t[s]) - to_double(r[s])) * inv_tau - lse_diff;
    mean += f[i];
  }
  mean /= static_cast<double>(n);
  for (size_t i = 0; i < n; ++i) {
    f[i] -= mean;
    out.sum_centered[i] += f[i];
  }
}

// Where a row's first non-finite value is: (which tensor, column), for the message.
template <typename In>
std::pair<const char*, int64_t> find_nonfinite(const In* t, const In* r, int64_t vocab) {
  for (int64_t v = 0; v < vocab; ++v) {
    if (!std::isfinite(to_double(t[v]))) return {"teacher", v};
  }
  for (int64_t v = 0; v < vocab; ++v) {
    if (!std::isfinite(to_double(r[v]))) return {"reference", v};
  }
  return {"teacher", -1};
}

// The first non-finite row a thread met (rows are checked in order, so the minimum over threads is
// the first overall).
struct BadRow {
  int64_t row = -1;
  const char* which = "";
  int64_t column = -1;
};

// One thread's range of rows, and what it needs to know about the input.
struct Job {
  const RowsInput* input;
  int64_t begin, end;
  int64_t vocab;
  double inv_tau;
  const bool* mask;
  const int64_t* sequence_ids;
  bool keep_sequence_sums;
  int64_t teacher_stride, reference_stride;
};

// --- The scalar loop (float64 throughout) --------------------------------------------------------

// What one row's scan found.
enum class RowStatus { kAdded, kNonfinite };

// One scored row in float64: every sum, the subset statistics and the sequence run.
template <typename In>
RowStatus scalar_row(const Job& job, int64_t row, const In* t, const In* r, std::vector<double>& f,
                     PartialSums& out) {
  const auto& subset = *job.input->subset;
  const int64_t vocab = job.vocab;
  const double inv_tau = job.inv_tau;
  double max_t = -std::numeric_limits<double>::infinity(), max_r = max_t;
  bool finite = true;
  for (int64_t v = 0; v < vocab; ++v) {
    const double a = to_double(t[v]), b = to_double(r[v]);
    finite = finite && std::isfinite(a) && std::isfinite(b);
    max_t = std::max(max_t, a);
    max_r = std::max(max_r, b);
  }
  if (!finite) return RowStatus::kNonfinite;
  double sum_t = 0.0, sum_r = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    sum_t += std::exp((to_double(t[v]) - max_t) * inv_tau);
    sum_r += std::exp((to_double(r[v]) - max_r) * inv_tau);
  }
  const double log_sum_t = std::log(sum_t), log_sum_r = std::log(sum_r);
  const double lse_t = max_t * inv_tau + log_sum_t;
  const double lse_r = max_r * inv_tau + log_sum_r;
  double kl_tr = 0.0, kl_rt = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    // (x - max) first: x / tau - lse would lose everything to rounding for huge logits.
    const double lt = (to_double(t[v]) - max_t) * inv_tau - log_sum_t;
    const double lr = (to_double(r[v]) - max_r) * inv_tau - log_sum_r;
    const double d = lt - lr, pt = std::exp(lt), pr = std::exp(lr);
    out.sum_delta[v] += d;
    out.sum_delta_sq[v] += d * d;
    out.sum_grad[v] += pt - pr;
    kl_tr += pt * d;
    kl_rt -= pr * d;
  }
  out.kl_teacher_reference += kl_tr;
  out.kl_reference_teacher += kl_rt;
  if (!subset.empty()) {
    const double m =
        subset_logsumexp(t, subset, inv_tau, lse_t) - subset_logsumexp(r, subset, inv_tau, lse_r);
    out.mass_shift += m;
    out.mass_shift_sq += m * m;
    add_centered(t, r, subset, inv_tau, lse_t - lse_r, f, out);
  }
  ++out.positions;
  add_to_runs(out.runs, job.sequence_ids[row], f, job.keep_sequence_sums);
  return RowStatus::kAdded;
}

// A non-finite row: counted when skipping, else recorded in bad; true when the caller must stop.
template <typename In>
bool reject_row(const Job& job, int64_t row, const In* t, const In* r, PartialSums& out,
                BadRow& bad) {
  if (job.input->skip_nonfinite) {
    ++out.skipped_nonfinite;
    return false;
  }
  const auto [which, column] = find_nonfinite(t, r, job.vocab);
  bad = {row, which, column};
  return true;
}

template <typename In>
void scalar_rows(const Job& job, PartialSums& out, BadRow& bad) {
  const In* teacher = job.input->teacher.data_ptr<In>();
  const In* reference = job.input->reference.data_ptr<In>();
  std::vector<double> f(job.input->subset->size());
  for (int64_t row = job.begin; row < job.end; ++row) {
    if (job.mask && !job.mask[row]) continue;
    const In* t = teacher + row * job.teacher_stride;
    const In* r = reference + row * job.reference_stride;
    if (scalar_row(job, row, t, r, f, out) == RowStatus::kNonfinite &&
        reject_row(job, row, t, r, out, bad)) {
      return;
    }
  }
}

// --- The AVX2 kernel -----------------------------------------------------------------------------
//
// Per row, sweep 1 (exp_sweep) reads both rows from memory once, chunk by chunk: e = 2^((x - m) k)
// with k = log2(e) / tau and m the chunk's shift (see exp_sweep), stored in the thread's row
// buffers, and the chunk's sum of e (float lanes flushed to float64 every kGroup elements). The
// row's log-sum-exp follows in float64 from the chunk sums, and p = e * 2^(m k - log2 Z) per chunk.
// Sweep 2 (block_sweep) walks a block of rows chunk by chunk: per vocabulary slot, it recomputes
// delta from the logits (still in cache), reads e, widens each row's terms to float64 and adds the
// block's rows to the [V] sums, loaded and stored once per block. The row buffers are 8 bytes per
// element and row.

#define LT_AVX2 __attribute__((target("avx2,fma,f16c")))

LT_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LT_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
LT_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// The first n (< 8) values, the remaining lanes repeating the last one (finite iff it is, and
// never above the maximum).
template <typename In>
LT_AVX2 inline __m256 load_partial(const In* p, int64_t n) {
  In tmp[8];
  for (int64_t i = 0; i < 8; ++i) tmp[i] = p[i < n ? i : n - 1];
  return load8(tmp);
}
LT_AVX2 inline __m256 lane_mask(int64_t n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), index));
}

// 2^y for y <= kExpHeadroom, clamped below near 2^-126 (the smallest normal float; values there
// are only approximately right, and negligible); NaN stays NaN. Degree-5
// polynomial for 2^f on [-1/2, 1/2] (relative-error minimax fit, 1.1e-7) after y = n + f: about
// 2e-7 relative in float arithmetic, 11 vector operations.
LT_AVX2 inline __m256 exp2_clamped(__m256 y) {
  y = _mm256_max_ps(_mm256_set1_ps(-126.0f), y);  // the second operand (y) wins when it is NaN
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(1.326472731307149e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671512991189957e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550733581185341e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402224242687225e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931470036506653e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

LT_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
LT_AVX2 inline double hsum(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
LT_AVX2 inline __m256d widen_add(__m256d acc, __m256 v) {
  return _mm256_add_pd(_mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v))),
                       _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
LT_AVX2 inline double hsum(__m256 v) { return hsum(widen_add(_mm256_setzero_pd(), v)); }
LT_AVX2 inline bool any_nan(__m256 v) {
  return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0;
}

// One row's sweep-1 results inside a thread's scratch.
template <typename In>
struct RowSlot {
  const In* t = nullptr;  // the logits rows, read again by sweep 2
  const In* r = nullptr;
  double lse_t = 0.0, lse_r = 0.0;
  float lse_diff = 0.0f;  // lse_t - lse_r
  float* e_t = nullptr;   // [padded V], zero past V
  float* e_r = nullptr;
  float* scale_t = nullptr;  // [chunks] 2^(-b - log2 Z): p = e * scale
  float* scale_r = nullptr;
};

// A thread's scratch: up to kMaxRowsPerBlock slots of 2 float row buffers each (8 bytes per element
// and slot), plus per-chunk values.
template <typename In>
struct Scratch {
  Scratch(int64_t padded_vocab, int64_t chunks, int64_t block_rows)
      : buffers(static_cast<size_t>(block_rows * 2 * padded_vocab)),
        scales(static_cast<size_t>(block_rows * 2 * chunks)),
        chunk_shift(static_cast<size_t>(2 * chunks)),
        chunk_sum(static_cast<size_t>(2 * chunks)) {
    TORCH_CHECK(block_rows >= 1 && block_rows <= kMaxRowsPerBlock, "Scratch: bad block ",
                block_rows);
    for (int64_t b = 0; b < block_rows; ++b) {
      float* base = buffers.data() + b * 2 * padded_vocab;
      slots[b].e_t = base;
      slots[b].e_r = base + padded_vocab;
      slots[b].scale_t = scales.data() + b * 2 * chunks;
      slots[b].scale_r = slots[b].scale_t + chunks;
    }
  }
  std::vector<float> buffers, scales, chunk_shift;
  std::vector<double> chunk_sum;
  RowSlot<In> slots[kMaxRowsPerBlock];
};

// The state of sweep 1 over one chunk of both rows.
struct ChunkSums {
  __m256d sum_t, sum_r;  // float64 lanes of the sums of e
  __m256 max_t, max_r;   // lane maxima of the logits
  __m256 bad;            // NaN iff a value is not finite
};

// Sweep 1 at [j, j + 8): e = 2^((x - shift) k) stored for both rows; lanes where keep is 0 store 0.
template <bool Partial>
LT_AVX2 inline void exp_step(__m256 xt, __m256 xr, __m256 keep, __m256 k, __m256 shift_t,
                             __m256 shift_r, float* e_t, float* e_r, __m256& st, __m256& sr,
                             ChunkSums& sums) {
  sums.bad = _mm256_fmadd_ps(_mm256_sub_ps(xt, xr), _mm256_setzero_ps(), sums.bad);
  sums.max_t = _mm256_max_ps(sums.max_t, xt);
  sums.max_r = _mm256_max_ps(sums.max_r, xr);
  __m256 et = exp2_clamped(_mm256_mul_ps(_mm256_sub_ps(xt, shift_t), k));
  __m256 er = exp2_clamped(_mm256_mul_ps(_mm256_sub_ps(xr, shift_r), k));
  if (Partial) {
    et = _mm256_and_ps(keep, et);
    er = _mm256_and_ps(keep, er);
  }
  _mm256_storeu_ps(e_t, et);
  _mm256_storeu_ps(e_r, er);
  st = _mm256_add_ps(st, et);
  sr = _mm256_add_ps(sr, er);
}

// Sweep 1 over [lo, hi) (hi - lo <= kChunk) of both rows with the given shifts: e into the row
// buffers, the sums of e (float lanes moved to float64 every kGroup elements), the lane maxima.
template <typename In>
LT_AVX2 ChunkSums exp_chunk(const In* t, const In* r, int64_t lo, int64_t hi, __m256 k,
                            __m256 shift_t, __m256 shift_r, float* e_t, float* e_r) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 low = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  ChunkSums sums{_mm256_setzero_pd(), _mm256_setzero_pd(), low, low, zero};
  int64_t j = lo;
  for (; j + kGroup <= hi; j += kGroup) {
    __m256 st = zero, sr = zero;
    for (int64_t i = j; i < j + kGroup; i += 8) {
      exp_step<false>(load8(t + i), load8(r + i), zero, k, shift_t, shift_r, e_t + i, e_r + i, st,
                      sr, sums);
    }
    sums.sum_t = widen_add(sums.sum_t, st);
    sums.sum_r = widen_add(sums.sum_r, sr);
  }
  __m256 st = zero, sr = zero;
  for (; j + 8 <= hi; j += 8) {
    exp_step<false>(load8(t + j), load8(r + j), zero, k, shift_t, shift_r, e_t + j, e_r + j, st, sr,
                    sums);
  }
  if (j < hi) {
    exp_step<true>(load_partial(t + j, hi - j), load_partial(r + j, hi - j), lane_mask(hi - j), k,
                   shift_t, shift_r, e_t + j, e_r + j, st, sr, sums);
  }
  sums.sum_t = widen_add(sums.sum_t, st);
  sums.sum_r = widen_add(sums.sum_r, sr);
  return sums;
}

// sum_c sums[c] 2^(shift[c] k) in float64 (k = log2(e) / tau) as 2^(top k) 2^(log2_rest), kept
// apart so that huge logits do not swamp log2_rest.
struct Log2Total {
  double top = 0.0, log2_rest = 0.0;
};
inline Log2Total log2_total(const float* shift, const double* sums, int64_t chunks, double k) {
  double top = shift[0];
  for (int64_t c = 1; c < chunks; ++c) top = std::max<double>(top, shift[c]);
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += sums[c] * std::exp2((shift[c] - top) * k);
  return {top, std::log2(total)};
}

// Outcome of sweep 1 over a row.
enum class SweepStatus { kDone, kNonfinite, kOutOfRange };

// Sweep 1 over one row. kNonfinite: a value is not finite (or x_T - x_R overflows); kOutOfRange:
// x / tau is too large for the float exponent arithmetic. The caller runs the float64 loop on both.
template <typename In>
LT_AVX2 SweepStatus exp_sweep(const In* t, const In* r, int64_t vocab, double inv_tau,
                              Scratch<In>& scratch, RowSlot<In>& slot) {
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  const double k2 = inv_tau * kLog2e;
  const __m256 vk = _mm256_set1_ps(static_cast<float>(k2));
  float* shift_t = scratch.chunk_shift.data();
  float* shift_r = shift_t + chunks;
  double* sum_t = scratch.chunk_sum.data();
  double* sum_r = sum_t + chunks;
  // The running shifts: logits already seen (the first ones to start), so never above the row's
  // maximum; a chunk whose maximum exceeds its shift by more than kExpHeadroom / k is redone with
  // its maximum, so e <= 2^kExpHeadroom and the row is read from memory once.
  float run_t = to_float(t[0]), run_r = to_float(r[0]);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(vocab, lo + kChunk);
    ChunkSums sums;
    for (;;) {
      sums = exp_chunk(t, r, lo, hi, vk, _mm256_set1_ps(run_t), _mm256_set1_ps(run_r), slot.e_t,
                       slot.e_r);
      if (any_nan(sums.bad)) return SweepStatus::kNonfinite;
      const float top_t = hmax(sums.max_t), top_r = hmax(sums.max_r);
      const bool redo = (top_t - run_t) * k2 > kExpHeadroom || (top_r - run_r) * k2 > kExpHeadroom;
      shift_t[c] = run_t;
      shift_r[c] = run_r;
      run_t = std::max(run_t, top_t);
      run_r = std::max(run_r, top_r);
      if (!redo) break;
    }
    sum_t[c] = hsum(sums.sum_t);
    sum_r[c] = hsum(sums.sum_r);
  }
  const int64_t padded = round_up8(vocab);
  for (int64_t j = vocab; j < padded; ++j) slot.e_t[j] = slot.e_r[j] = 0.0f;
  const Log2Total z_t = log2_total(shift_t, sum_t, chunks, k2);
  const Log2Total z_r = log2_total(shift_r, sum_r, chunks, k2);
  if (!std::isfinite(z_t.log2_rest) || !std::isfinite(z_r.log2_rest)) {
    return SweepStatus::kOutOfRange;
  }
  for (int64_t c = 0; c < chunks; ++c) {
    slot.scale_t[c] = static_cast<float>(std::exp2((shift_t[c] - z_t.top) * k2 - z_t.log2_rest));
    slot.scale_r[c] = static_cast<float>(std::exp2((shift_r[c] - z_r.top) * k2 - z_r.log2_rest));
  }
  slot.t = t;
  slot.r = r;
  slot.lse_t = z_t.top * inv_tau + z_t.log2_rest * kLn2;
  slot.lse_r = z_r.top * inv_tau + z_r.log2_rest * kLn2;
  // Differences of the parts first: the offsets cancel before the small terms are added.
  slot.lse_diff =
      static_cast<float>((z_t.top - z_r.top) * inv_tau + (z_t.log2_rest - z_r.log2_rest) * kLn2);
  return SweepStatus::kDone;
}

// Sweep 2 at [j, j + 8) for a block of Rows rows given their logits there (xt[b], xr[b]).
template <typename In, int Rows>
LT_AVX2 inline void block_step(const RowSlot<In>* slots, int64_t j, const __m256* xt,
                               const __m256* xr, __m256 itf, const __m256* lse_diff,
                               const __m256* scale_t, const __m256* scale_r, __m256* kt, __m256* kr,
                               double* sum_delta, double* sum_sq, double* sum_grad) {
  // Each row's terms are widened to float64 on their own, so a row adds the same numbers whatever
  // block it falls in (merge invariance holds to float64 rounding).
  __m256d sums[6];
  for (int h = 0; h < 2; ++h) {
    sums[h] = _mm256_loadu_pd(sum_delta + j + 4 * h);
    sums[2 + h] = _mm256_loadu_pd(sum_sq + j + 4 * h);
    sums[4 + h] = _mm256_loadu_pd(sum_grad + j + 4 * h);
  }
  for (int b = 0; b < Rows; ++b) {
    const __m256 d = _mm256_fmsub_ps(_mm256_sub_ps(xt[b], xr[b]), itf, lse_diff[b]);
    const __m256 pt = _mm256_mul_ps(_mm256_loadu_ps(slots[b].e_t + j), scale_t[b]);
    const __m256 pr = _mm256_mul_ps(_mm256_loadu_ps(slots[b].e_r + j), scale_r[b]);
    const __m256 g = _mm256_sub_ps(pt, pr);
    kt[b] = _mm256_fmadd_ps(pt, d, kt[b]);
    kr[b] = _mm256_fmadd_ps(pr, d, kr[b]);
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
    const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
    sums[0] = _mm256_add_pd(sums[0], d0);
    sums[1] = _mm256_add_pd(sums[1], d1);
    sums[2] = _mm256_fmadd_pd(d0, d0, sums[2]);
    sums[3] = _mm256_fmadd_pd(d1, d1, sums[3]);
    sums[4] = _mm256_add_pd(sums[4], _mm256_cvtps_pd(_mm256_castps256_ps128(g)));
    sums[5] = _mm256_add_pd(sums[5], _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1)));
  }
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_pd(sum_delta + j + 4 * h, sums[h]);
    _mm256_storeu_pd(sum_sq + j + 4 * h, sums[2 + h]);
    _mm256_storeu_pd(sum_grad + j + 4 * h, sums[4 + h]);
  }
}

// Sweep 2 over a block of Rows rows: the [V] sums and the per-row KL terms.
template <typename In, int Rows>
LT_AVX2 void block_sweep(const RowSlot<In>* slots, int64_t vocab, double inv_tau,
                         PartialSums& out) {
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  const __m256 itf = _mm256_set1_ps(static_cast<float>(inv_tau));
  __m256 lse_diff[Rows];
  double kl_tr[Rows] = {}, kl_rt[Rows] = {};
  for (int b = 0; b < Rows; ++b) lse_diff[b] = _mm256_set1_ps(slots[b].lse_diff);
  double* sum_delta = out.sum_delta.data();
  double* sum_sq = out.sum_delta_sq.data();
  double* sum_grad = out.sum_grad.data();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(vocab, lo + kChunk);
    __m256 scale_t[Rows], scale_r[Rows], kt[Rows], kr[Rows], xt[Rows], xr[Rows];
    for (int b = 0; b < Rows; ++b) {
      scale_t[b] = _mm256_set1_ps(slots[b].scale_t[c]);
      scale_r[b] = _mm256_set1_ps(slots[b].scale_r[c]);
      kt[b] = kr[b] = _mm256_setzero_ps();
    }
    int64_t j = lo;
    for (; j + 8 <= hi; j += 8) {
      for (int b = 0; b < Rows; ++b) {
        xt[b] = load8(slots[b].t + j);
        xr[b] = load8(slots[b].r + j);
      }
      block_step<In, Rows>(slots, j, xt, xr, itf, lse_diff, scale_t, scale_r, kt, kr, sum_delta,
                           sum_sq, sum_grad);
    }
    if (j < hi) {  // the row's last, partial vector: e is 0 in the lanes past V
      for (int b = 0; b < Rows; ++b) {
        xt[b] = load_partial(slots[b].t + j, hi - j);
        xr[b] = load_partial(slots[b].r + j, hi - j);
      }
      block_step<In, Rows>(slots, j, xt, xr, itf, lse_diff, scale_t, scale_r, kt, kr, sum_delta,
                           sum_sq, sum_grad);
    }
    for (int b = 0; b < Rows; ++b) {
      kl_tr[b] += hsum(kt[b]);
      kl_rt[b] -= hsum(kr[b]);
    }
  }
  for (int b = 0; b < Rows; ++b) {
    out.kl_teacher_reference += kl_tr[b];
    out.kl_reference_teacher += kl_rt[b];
  }
}

template <typename In>
void run_block(const RowSlot<In>* slots, int64_t count, int64_t vocab, double inv_tau,
               PartialSums& out) {
  static_assert(kMaxRowsPerBlock == 4, "run_block dispatches 1 to 4 rows");
  switch (count) {
    case 1:
      block_sweep<In, 1>(slots, vocab, inv_tau, out);
      break;
    case 2:
      block_sweep<In, 2>(slots, vocab, inv_tau, out);
      break;
    case 3:
      block_sweep<In, 3>(slots, vocab, inv_tau, out);
      break;
    case 4:
      block_sweep<In, 4>(slots, vocab, inv_tau, out);
      break;
    default:
      TORCH_CHECK(false, "run_block: unexpected row count ", count);
  }
}

// The subset's mass shift of a row from the exp buffers, falling back to float64 from the logits
// when a mass is too small for float.
template <typename In>
double mass_shift(const std::vector<int64_t>& subset, double inv_tau, const RowSlot<In>& slot) {
  double mass_t = 0.0, mass_r = 0.0;
  for (const int64_t s : subset) {
    mass_t += static_cast<double>(slot.e_t[s]) * slot.scale_t[s / kChunk];
    mass_r += static_cast<double>(slot.e_r[s]) * slot.scale_r[s / kChunk];
  }
  const double log_t = mass_t > kSubsetMassFloatFloor
                           ? std::log(mass_t)
                           : subset_logsumexp(slot.t, subset, inv_tau, slot.lse_t);
  const double log_r = mass_r > kSubsetMassFloatFloor
                           ? std::log(mass_r)
                           : subset_logsumexp(slot.r, subset, inv_tau, slot.lse_r);
  return log_t - log_r;
}

template <typename In>
LT_AVX2 void avx2_rows(const Job& job, PartialSums& out, BadRow& bad) {
  const In* teacher = job.input->teacher.data_ptr<In>();
  const In* reference = job.input->reference.data_ptr<In>();
  const auto& subset = *job.input->subset;
  const int64_t vocab = job.vocab;
  const int64_t block = rows_per_block(vocab, sizeof(In));
  Scratch<In> scratch(round_up8(vocab), (vocab + kChunk - 1) / kChunk, block);
  std::vector<double> f(subset.size());
  int64_t filled = 0;
  for (int64_t row = job.begin; row < job.end; ++row) {
    if (job.mask && !job.mask[row]) continue;
    const In* t = teacher + row * job.teacher_stride;
    const In* r = reference + row * job.reference_stride;
    RowSlot<In>& slot = scratch.slots[filled];
    const SweepStatus status = exp_sweep(t, r, vocab, job.inv_tau, scratch, slot);
    if (status != SweepStatus::kDone) {
      // Huge finite logits (x / tau near the float range, or a difference that overflows) run
      // through the float64 loop, which also tells them from non-finite ones.
      if (scalar_row(job, row, t, r, f, out) == RowStatus::kNonfinite &&
          reject_row(job, row, t, r, out, bad)) {
        break;  // the rows before it are still added below, then the caller throws
      }
      continue;
    }
    if (!subset.empty()) {
      const double m = mass_shift(subset, job.inv_tau, slot);
      out.mass_shift += m;
      out.mass_shift_sq += m * m;
      add_centered(t, r, subset, job.inv_tau, slot.lse_t - slot.lse_r, f, out);
    }
    ++out.positions;
    add_to_runs(out.runs, job.sequence_ids[row], f, job.keep_sequence_sums);
    if (++filled == block) {
      run_block(scratch.slots, filled, vocab, job.inv_tau, out);
      filled = 0;
    }
  }
  if (filled > 0) run_block(scratch.slots, filled, vocab, job.inv_tau, out);
}

#undef LT_AVX2

template <typename In>
void run_rows(const Job& job, bool avx2, PartialSums& out, BadRow& bad) {
  if constexpr (std::is_same_v<In, double>) {
    scalar_rows<In>(job, out, bad);
  } else {
    if (avx2) {
      avx2_rows<In>(job, out, bad);
    } else {
      scalar_rows<In>(job, out, bad);
    }
  }
}

}  // namespace

PartialSums::PartialSums(int64_t vocab_size, int64_t subset_size, int64_t padded_vocab)
    : vocab_size(vocab_size),
      sum_delta(static_cast<size_t>(padded_vocab), 0.0),
      sum_delta_sq(static_cast<size_t>(padded_vocab), 0.0),
      sum_grad(static_cast<size_t>(padded_vocab), 0.0),
      sum_centered(static_cast<size_t>(subset_size), 0.0) {}

void PartialSums::add(const PartialSums& other) {
  for (int64_t v = 0; v < vocab_size; ++v) {
    sum_delta[v] += other.sum_delta[v];
    sum_delta_sq[v] += other.sum_delta_sq[v];
    sum_grad[v] += other.sum_grad[v];
  }
  for (size_t i = 0; i < sum_centered.size(); ++i) sum_centered[i] += other.sum_centered[i];
  kl_teacher_reference += other.kl_teacher_reference;
  kl_reference_teacher += other.kl_reference_teacher;
  mass_shift += other.mass_shift;
  mass_shift_sq += other.mass_shift_sq;
  positions += other.positions;
  skipped_nonfinite += other.skipped_nonfinite;
  for (const SequenceRun& run : other.runs) {
    if (!runs.empty() && runs.back().id == run.id) {
      runs.back().count += run.count;
      for (size_t i = 0; i < run.sum.size(); ++i) runs.back().sum[i] += run.sum[i];
    } else {
      runs.push_back(run);
    }
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

std::string nonfinite_message(const char* which, int64_t row, int64_t column,
                              int64_t positions_per_batch) {
  std::ostringstream out;
  out << which << " logits have a non-finite value in scored row " << row;
  if (positions_per_batch > 0) {
    out << " (batch " << row / positions_per_batch << ", position " << row % positions_per_batch
        << ")";
  }
  if (column >= 0) out << " at vocabulary index " << column;
  out << "; mask the position out or pass skip_nonfinite=true to skip and count such rows";
  return out.str();
}

PartialSums accumulate_cpu(const RowsInput& input, bool force_scalar) {
  const int64_t rows = input.teacher.size(0);
  const int64_t vocab = input.teacher.size(1);
  const int64_t subset_size = static_cast<int64_t>(input.subset->size());
  const bool avx2 = !force_scalar && cpu_has_avx2();
  const bool* mask = input.mask.defined() ? input.mask.data_ptr<bool>() : nullptr;
  const int64_t scored = mask ? input.mask.sum().item<int64_t>() : rows;
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), scored / kMinRowsPerThread,
                            scored * vocab / kMinElementsPerThread}));

  Job base{&input,
           0,
           0,
           vocab,
           1.0 / input.temperature,
           mask,
           input.sequence_ids.data_ptr<int64_t>(),
           false,
           input.teacher.stride(0),
           input.reference.stride(0)};
  base.keep_sequence_sums = input.per_sequence_sums && subset_size > 0;
  std::vector<std::unique_ptr<PartialSums>> partials(static_cast<size_t>(threads));
  std::vector<BadRow> bad(static_cast<size_t>(threads));
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Job job = base;
      job.begin = rows * i / threads;
      job.end = rows * (i + 1) / threads;
      partials[i] = std::make_unique<PartialSums>(vocab, subset_size, round_up8(vocab));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.teacher.scalar_type(),
                                      "fingerprint_accumulate",
                                      [&] { run_rows<scalar_t>(job, avx2, *partials[i], bad[i]); });
    }
  };
  if (threads == 1) {
    work(0, 1);
  } else {
    // Plain threads, not at::parallel_for: that runs serially in a library built without OpenMP
    // flags (its OpenMP backend is an inline header), which libtransfer is.
    std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
    auto guarded = [&](int64_t i) {
      try {
        work(i, i + 1);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    };
    std::vector<std::thread> pool;
    for (int64_t i = 1; i < threads; ++i) pool.emplace_back(guarded, i);
    guarded(0);
    for (std::thread& thread : pool) thread.join();
    for (const auto& error : errors) {
      if (error) std::rethrow_exception(error);
    }
  }
  for (const BadRow& b : bad) {
    if (b.row >= 0) {
      TORCH_CHECK_VALUE(false,
                        nonfinite_message(b.which, b.row, b.column, input.positions_per_batch));
    }
  }
  for (int64_t i = 1; i < threads; ++i) partials[0]->add(*partials[i]);
  return std::move(*partials[0]);
}

}  // namespace libtransfer::fingerprint::detail
