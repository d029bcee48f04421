// Part of quantized_vnni.cpp, included there after the int8 kernel: the int8 matmul on AMX tiles, in that file's
// translation unit and anonymous namespace (it uses the int8 kernel's layout and epilogue).
#pragma once

namespace {

#ifdef __AMX_INT8__
// ---- int8 on AMX (Xeons from Sapphire Rapids): the same integer sums, 16 rows × 16 outputs × 64 inputs a step ----
// The packed layout above is already what TDPBUSD takes as its second operand: 16 quads of inputs for 16 outputs,
// 64 bytes a row, so 64 inputs of one block are one contiguous 1 KB tile. The activations (uint8, +128 as above) are
// the first, up to 16 rows by 64 inputs. TDPBUSD multiplies unsigned by signed bytes and adds in int32 without
// saturating, as vpdpbusd does, and the epilogue is the VNNI kernel's, so the results are bitwise the same. From 16
// rows VNNI spends its time multiplying, not reading (GRPO's 16-row rollouts, benchmarks/RESULTS.md round 9); one
// AMX instruction does 16 times the work of one vpdpbusd.
struct TileConfig {  // the 64-byte layout LDTILECFG reads
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out AMX's 8 KB of tile state only to a process that asks for it (arch_prctl, once per process)
bool amx_granted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

constexpr int64_t kAmxBlocks = 4;  // output blocks per pass: tiles 0-3 accumulate, 4 holds activations, 5-6 weights

inline void store_tile(int64_t tile, int32_t* sums) {  // tile numbers are part of the instruction, not operands
  switch (tile) {
    case 0: _tile_stored(0, sums, 64); break;
    case 1: _tile_stored(1, sums, 64); break;
    case 2: _tile_stored(2, sums, 64); break;
    default: _tile_stored(3, sums, 64); break;
  }
}

template <typename Out>
void run_amx(const uint8_t* xp, const float* sxp, const int8_t* wp, const float* swp, const int32_t* rp, Out* yp,
             int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, N / 16, kAmxBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t sums[16 * 16];
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
      TileConfig config;  // per thread and per row count: each thread has its own tile registers
      for (int t = 0; t < 7; ++t) {
        config.rows[t] = t < 5 ? rows : 16;  // weights: 16 quads of inputs
        config.bytes_per_row[t] = 64;
      }
      _tile_loadconfig(&config);
      const uint8_t* x = xp + m0 * K;
      for (int64_t nb = begin; nb < end; nb += kAmxBlocks) {
        const int64_t take = std::min(kAmxBlocks, end - nb);
        const int8_t* block = wp + nb * K * 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < K; k += 64) {
          _tile_loadd(4, x + k, K);
          _tile_loadd(5, block + k * 16, 64);
          _tile_dpbusd(0, 4, 5);
          if (take > 1) { _tile_loadd(6, block + K * 16 + k * 16, 64); _tile_dpbusd(1, 4, 6); }
          if (take > 2) { _tile_loadd(5, block + 2 * K * 16 + k * 16, 64); _tile_dpbusd(2, 4, 5); }
          if (take > 3) { _tile_loadd(6, block + 3 * K * 16 + k * 16, 64); _tile_dpbusd(3, 4, 6); }
        }
        for (int64_t b = 0; b < take; ++b) {
          store_tile(b, sums);
          const int64_t n0 = (nb + b) * 16;
          const __m512 scales = _mm512_loadu_ps(swp + n0);
          const __m512 offsets = _mm512_cvtepi32_ps(_mm512_slli_epi32(_mm512_loadu_si512(rp + n0), 7));
          for (int r = 0; r < rows; ++r) {
            const __m512 dot = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + r * 16)), offsets);
            store16(yp + (m0 + r) * N + n0, _mm512_mul_ps(_mm512_mul_ps(dot, scales), _mm512_set1_ps(sxp[m0 + r])));
          }
        }
      }
      _tile_release();
    }
  });
}
#endif

}  // namespace
