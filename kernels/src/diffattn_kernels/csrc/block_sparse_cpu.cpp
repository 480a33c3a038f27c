// Block-sparse flash attention for the CPU: the `torch` backend's compiled inner loop.
//
// Every task is one (batch, head, query block): it walks the query block's list of key blocks (any blocks, in
// ascending order) in tiles of up to `max_tile` keys, computes the scores tile by tile, keeps an online softmax in
// float32 and accumulates P V block by block. Unlike a stack of SDPA calls, nothing is paid per key run: K and V are
// packed once per call (by the Python side) and every tile reads its blocks in place, wherever they are.
//
// One source, built once per instruction set (kernels/src/cpu_block_sparse.py picks the build at run time, the
// way ATen compiles its CPU_CAPABILITY kernels): CPU_CAPABILITY_AVX512, CPU_CAPABILITY_AVX2, or no x86 define
// (aarch64: ATen's Vectorized<float> is NEON there). Two GEMM paths:
//   kernel "vec":    register-tiled float32 GEMMs written with at::vec::Vectorized<float> (every ISA). bfloat16
//                    inputs are computed in float32 here (q converted per task, K and V packed as float32).
//   kernel "onednn": oneDNN batch-reduce GEMMs through ATen's cpublas (AVX-512 builds only), bfloat16 with AMX /
//                    native bf16 where cpublas offers it; float32 on any AVX-512 CPU.
//
// Layouts (prepared in kernels/src/cpu_block_sparse.py, keys padded to a multiple of the key block size Bk):
//   float32 (both kernels, and bfloat16 under "vec"): kp (B, H, S_pad/Bk, D, Bk) K^T per key block;
//                                                     vp (B, H, S_pad, D) V
//   bfloat16 under "onednn": kp (B, H, S_pad/Bk, D/2, Bk, 2) K^T per key block in VNNI-2 pairs;
//                            vp (B, H, S_pad/2, D, 2) V in pairs
// K^T is packed per key block so that a GEMM's rows of B lie Bk apart (a K^T over all keys puts them S_pad apart:
// on the same cache sets). Keys at or beyond `num_kv` are padding and get probability 0 (only the last key block
// can hold padding, and it is last in any list it is in).

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t W = fVec::size();

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kIsa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kIsa = "avx2";
#elif defined(__aarch64__)
constexpr const char* kIsa = "neon";
#else
constexpr const char* kIsa = "default";
#endif

// ---------------------------------------------------------------------------------------------------------------
// float32 GEMM, C (M x N) = or += A (M x K, row stride lda) B (K x N, row stride ldb), register-tiled: MR rows of A
// broadcast against NV vectors of a row of B, MR * NV accumulators (6 x 2 = 12 of 16 AVX2 registers).

constexpr int kMR = 6;
constexpr int kNV = W >= 8 ? 2 : 4;  // 4-wide vectors (NEON) take four per row
constexpr int64_t kNR = kNV * W;

// One MR x (NV vectors) tile; the last vector holds `last` columns (W for a whole one).
template <int MR, int NV>
inline void micro_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                       bool accumulate, int64_t last) {
  fVec c[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t count = v == NV - 1 ? last : W;
      c[r][v] = accumulate ? fVec::loadu(C + r * ldc + v * W, count) : fVec(0.0f);
    }
  }
  if (last == W) {
    for (int64_t k = 0; k < K; ++k) {
      const float* b_row = B + k * ldb;
      fVec b[NV];
      for (int v = 0; v < NV; ++v) b[v] = fVec::loadu(b_row + v * W);
      for (int r = 0; r < MR; ++r) {
        const fVec a(A[r * lda + k]);
        for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
      }
    }
  } else {  // a ragged right edge (key block or head dim not a multiple of the vector width): partial loads
    for (int64_t k = 0; k < K; ++k) {
      const float* b_row = B + k * ldb;
      fVec b[NV];
      for (int v = 0; v < NV; ++v) b[v] = fVec::loadu(b_row + v * W, v == NV - 1 ? last : W);
      for (int r = 0; r < MR; ++r) {
        const fVec a(A[r * lda + k]);
        for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * W, v == NV - 1 ? last : W);
  }
}

// All row panels for one column strip of NV vectors (the strip of B stays in L1 across the panels).
template <int NV>
void column_strip(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, bool accumulate, int64_t last) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) micro_tile<kMR, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate, last);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: micro_tile<5, NV>(K, a, lda, B, ldb, c, ldc, accumulate, last); break;
    case 4: micro_tile<4, NV>(K, a, lda, B, ldb, c, ldc, accumulate, last); break;
    case 3: micro_tile<3, NV>(K, a, lda, B, ldb, c, ldc, accumulate, last); break;
    case 2: micro_tile<2, NV>(K, a, lda, B, ldb, c, ldc, accumulate, last); break;
    case 1: micro_tile<1, NV>(K, a, lda, B, ldb, c, ldc, accumulate, last); break;
    default: break;
  }
  static_assert(kMR == 6, "the row-tail switch above covers kMR - 1 rows");
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + kNR <= N; j += kNR) column_strip<kNV>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate, W);
  for (; j < N; j += W) column_strip<1>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate, std::min(W, N - j));
}

// ---------------------------------------------------------------------------------------------------------------
// online softmax pieces

float scaled_row_max(const float* s, int64_t n, float scale) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= W) {
    fVec acc = fVec::loadu(s);
    for (j = W; j + W <= n; j += W) acc = at::vec::maximum(acc, fVec::loadu(s + j));
    best = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, acc);
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best * scale;
}

// p[j] <- exp(s[j] * scale - m) for j < n (p may be s itself); returns the sum.
float exp_into(const float* s, float* p, int64_t n, float scale, float m) {
  const fVec vscale(scale), vm(m);
  fVec acc(0.0f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const fVec x = (fVec::loadu(s + j) * vscale - vm).exp_u20();
    x.store(p + j);
    acc = acc + x;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    const float e = std::exp(s[j] * scale - m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

#if defined(CPU_CAPABILITY_AVX512)
// The bfloat16 probabilities of the oneDNN kernel, written straight from registers (round to nearest even, one
// AVX512-BF16 instruction per 16 values): the target attribute allows that instruction in this function only, and
// it runs only where cpublas reports bf16 brgemm (AMX or AVX512-BF16 CPUs).
__attribute__((target("avx512bf16"))) float exp_into(const float* s, at::BFloat16* p, int64_t n, float scale,
                                                     float m) {
  const fVec vscale(scale), vm(m);
  fVec acc(0.0f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const fVec x = (fVec::loadu(s + j) * vscale - vm).exp_u20();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
    acc = acc + x;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    const float e = std::exp(s[j] * scale - m);
    p[j] = static_cast<at::BFloat16>(e);
    sum += e;
  }
  return sum;
}
#endif

enum class Kernel { kVec, kOneDnn };

// scalar_t: the dtype of q and out; packed_t: the dtype of kp and vp (float for kVec).
template <typename scalar_t, typename packed_t, Kernel kKernel>
void forward(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, at::Tensor& out, at::Tensor& lse,
             const at::Tensor& q_starts, const at::Tensor& block_offsets, const at::Tensor& block_ids,
             int64_t q_rows, int64_t num_kv, double scale_d, int64_t max_tile) {
  constexpr bool kVnni = kKernel == Kernel::kOneDnn && std::is_same_v<packed_t, at::BFloat16>;
  constexpr bool kConvertQ = kKernel == Kernel::kVec && !std::is_same_v<scalar_t, float>;
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_block = kp.size(4);
  const int64_t k_block_stride = kp.stride(2);
  const int64_t tile_blocks = std::max<int64_t>(1, max_tile / kv_block);  // whole key blocks per tile
  const int64_t kv_tile = tile_blocks * kv_block;
  const int64_t members = q_starts.size(0);
  const float scale = static_cast<float>(scale_d);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const packed_t* k_data = kp.data_ptr<packed_t>();
  const packed_t* v_data = vp.data_ptr<packed_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* offsets = block_offsets.data_ptr<int64_t>();
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qss = q.stride(2);
  const int64_t osb = out.stride(0), osh = out.stride(1), oss = out.stride(2);
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1), lss = lse.stride(2);
  const int64_t khead = kp.stride(1), kbatch = kp.stride(0), vhead = vp.stride(1), vbatch = vp.stride(0);

  // Threads of our own (as many as torch uses): ATen's parallel_for is OpenMP-inline and an extension built
  // without -fopenmp would run it serially, while linking a second OpenMP runtime beside torch's invites trouble.
  // Tasks differ in cost (key counts vary per query block), so threads take the next task from a shared counter.
  // block lists per query block shared by the heads (members + 1 offsets) or one per head and query block
  // (heads * members + 1 offsets, head-major)
  const bool per_head = block_offsets.size(0) == heads * members + 1 && heads > 1;
  const int64_t total = batch * heads * members;
  std::atomic<int64_t> next_task{0};
  auto worker = [&]() {
    std::vector<float> scores(q_rows * kv_tile);
    std::vector<packed_t> probs(kVnni ? q_rows * kv_tile : 0);
    std::vector<float> q_f32(kConvertQ ? q_rows * dim : 0);
    std::vector<float> acc(q_rows * dim), row_max(q_rows), row_sum(q_rows), new_max(q_rows), alpha(q_rows);
    for (int64_t task = next_task.fetch_add(1); task < total; task = next_task.fetch_add(1)) {
      const int64_t member = task % members, bh = task / members;
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t q0 = starts[member];
      const int64_t rows = std::min(q_rows, q.size(2) - q0);
      const scalar_t* qp = q_data + b * qsb + h * qsh + q0 * qss;
      const packed_t* kb = k_data + b * kbatch + h * khead;
      const packed_t* vb = v_data + b * vbatch + h * vhead;
      const float* qa = nullptr;  // the float32 query rows the vec kernel reads
      int64_t lda = dim;
      if constexpr (kConvertQ) {
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t d = 0; d < dim; ++d) q_f32[i * dim + d] = static_cast<float>(qp[i * qss + d]);
        }
        qa = q_f32.data();
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        qa = qp;
        lda = qss;
      }
      std::fill(acc.begin(), acc.begin() + rows * dim, 0.0f);
      std::fill(row_max.begin(), row_max.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.0f);
      const int64_t row = per_head ? h * members + member : member;  // this task's block list
      for (int64_t t0 = offsets[row]; t0 < offsets[row + 1]; t0 += tile_blocks) {
        const int64_t count = std::min(tile_blocks, offsets[row + 1] - t0);  // key blocks of this tile
        const int64_t* tile = ids + t0;
        const int64_t n = count * kv_block;
        // keys of the tile before the padding of its last block (the only one that can have any)
        const int64_t valid = n - std::clamp<int64_t>((tile[count - 1] + 1) * kv_block - num_kv, 0, kv_block);
        if (valid <= 0) continue;
        for (int64_t c = 0; c < count; ++c) {  // scores of each key block of the tile
          const packed_t* kt = kb + tile[c] * k_block_stride;
          const int64_t col = c * kv_block;
          if constexpr (kKernel == Kernel::kVec) {
            gemm_f32(rows, kv_block, dim, qa, lda, kt, kv_block, scores.data() + col, n, false);
          } else {
#if defined(CPU_CAPABILITY_AVX512)
            at::native::cpublas::brgemm(rows, kv_block, dim, qss, kv_block, n, false, qp, kt,
                                        scores.data() + col, kVnni);
#endif
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          new_max[i] = std::max(row_max[i], scaled_row_max(scores.data() + i * n, valid, scale));
        }
        // alpha = exp(old max - new max), a vector of rows at a time (exp(-inf) = 0 for rows that saw no key yet)
        at::vec::map2([](fVec old_m, fVec new_m) { return (old_m - new_m).exp_u20(); }, alpha.data(),
                      row_max.data(), new_max.data(), rows);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = scores.data() + i * n;
          float sum;
          if constexpr (kVnni) {
#if defined(CPU_CAPABILITY_AVX512)
            packed_t* p = probs.data() + i * n;
            sum = exp_into(s, p, valid, scale, new_max[i]);
            std::fill(p + valid, p + n, static_cast<packed_t>(0.0f));
#endif
          } else {
            sum = exp_into(s, s, valid, scale, new_max[i]);
            std::fill(s + valid, s + n, 0.0f);
          }
          row_sum[i] = row_sum[i] * alpha[i] + sum;
          row_max[i] = new_max[i];
          if (alpha[i] != 1.0f) {
            float* a = acc.data() + i * dim;
            const fVec va(alpha[i]);
            at::vec::map([va](fVec x) { return x * va; }, a, a, dim);
          }
        }
        // (Splitting the rows so that a chunk's scores stay in L1 was slower with oneDNN: the GEMMs lose more
        // than the softmax passes gain; measured with chunks of 16-64 rows.)
        for (int64_t c = 0; c < count; ++c) {  // P V, one key block at a time (blocks need not be adjacent)
          const int64_t col = c * kv_block, k0 = tile[c] * kv_block;
          if constexpr (kKernel == Kernel::kVec) {
            gemm_f32(rows, dim, kv_block, scores.data() + col, n, vb + k0 * dim, dim, acc.data(), dim, true);
          } else {
#if defined(CPU_CAPABILITY_AVX512)
            if constexpr (kVnni) {
              at::native::cpublas::brgemm(rows, dim, kv_block, n, dim, dim, true, probs.data() + col,
                                          vb + (k0 / 2) * dim * 2, acc.data(), true);
            } else {
              at::native::cpublas::brgemm(rows, dim, kv_block, n, dim, dim, true, scores.data() + col,
                                          vb + k0 * dim, acc.data(), false);
            }
#endif
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* o = out_data + b * osb + h * osh + (q0 + i) * oss;
        const float* a = acc.data() + i * dim;
        const bool any = row_sum[i] > 0.0f;
        const float inv = any ? 1.0f / row_sum[i] : 0.0f;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
        lse_data[b * lsb + h * lsh + (q0 + i) * lss] =
            any ? row_max[i] + std::log(row_sum[i]) : -std::numeric_limits<float>::infinity();
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kKernel == Kernel::kOneDnn) at::native::cpublas::brgemm_release(kVnni);
#endif
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
}

bool onednn_supported(at::ScalarType dtype) {
#if defined(CPU_CAPABILITY_AVX512)
  // cpublas' own check (AMX or AVX512-BF16 for bfloat16, as oneDNN sees the CPU); float32 runs on any AVX-512 CPU
  return dtype == at::kFloat || at::native::cpublas::could_pack(dtype);
#else
  (void)dtype;
  return false;
#endif
}

void block_sparse_forward(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, at::Tensor& out,
                          at::Tensor& lse, const at::Tensor& q_starts, const at::Tensor& block_offsets,
                          const at::Tensor& block_ids, int64_t q_rows, int64_t num_kv, double scale, int64_t max_tile,
                          const std::string& kernel) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "q must be (B, H, S, D) with a contiguous last dimension");
  TORCH_CHECK(kp.is_contiguous() && vp.is_contiguous(), "packed k and v must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(3) == 1, "out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32");
  TORCH_CHECK(block_offsets.size(0) == q_starts.size(0) + 1 || block_offsets.size(0) == q.size(1) * q_starts.size(0) + 1,
              "block_offsets needs one entry per query block + 1, or one per head and query block + 1 (head-major)");
  TORCH_CHECK(block_ids.numel() == 0 || (block_ids.min().item<int64_t>() >= 0 &&
                                         block_ids.max().item<int64_t>() < kp.size(2)),
              "block_ids must index the packed key blocks");
  TORCH_CHECK(q.size(3) % 2 == 0, "head dim must be even");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "block_sparse_forward takes bfloat16 or float32, got ", q.scalar_type());
  if (kernel == "vec") {
    TORCH_CHECK(kp.scalar_type() == at::kFloat && vp.scalar_type() == at::kFloat,
                "the vec kernel reads float32 packed k and v (pack bfloat16 inputs as float32)");
    if (q.scalar_type() == at::kBFloat16) {
      forward<at::BFloat16, float, Kernel::kVec>(q, kp, vp, out, lse, q_starts, block_offsets, block_ids, q_rows, num_kv,
                                                 scale, max_tile);
    } else {
      forward<float, float, Kernel::kVec>(q, kp, vp, out, lse, q_starts, block_offsets, block_ids, q_rows, num_kv, scale,
                                          max_tile);
    }
    return;
  }
  TORCH_CHECK(kernel == "onednn", "kernel must be 'vec' or 'onednn', got '", kernel, "'");
  TORCH_CHECK(onednn_supported(q.scalar_type()), "the onednn kernel needs an AVX-512 build and cpublas brgemm for ",
              q.scalar_type(), " on this CPU (", kIsa, " build); use kernel='vec'");
  TORCH_CHECK(kp.scalar_type() == q.scalar_type() && vp.scalar_type() == q.scalar_type(),
              "the onednn kernel reads k and v packed in q's dtype");
#if defined(CPU_CAPABILITY_AVX512)
  if (q.scalar_type() == at::kBFloat16) {
    forward<at::BFloat16, at::BFloat16, Kernel::kOneDnn>(q, kp, vp, out, lse, q_starts, block_offsets, block_ids, q_rows,
                                                         num_kv, scale, max_tile);
  } else {
    forward<float, float, Kernel::kOneDnn>(q, kp, vp, out, lse, q_starts, block_offsets, block_ids, q_rows, num_kv, scale,
                                           max_tile);
  }
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward, "block-sparse flash attention forward (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("onednn_supported", [](bool bfloat16) { return onednn_supported(bfloat16 ? at::kBFloat16 : at::kFloat); },
        "whether the onednn kernel (cpublas brgemm) runs bfloat16 (True) or float32 (False) here");
  m.def("isa", []() { return std::string(kIsa); }, "the instruction set this build was compiled for");
  m.def("vector_width", []() { return static_cast<int64_t>(W); }, "float32 lanes of at::vec::Vectorized<float>");
}
