// What the native ops that run on AMX tiles share (linear_cpu.cpp, attention_amx.cpp): whether
// this build and this process may use the tiles, and their configuration.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#define TREE_KERNELS_AMX 1

namespace tree_kernels_cpu {

// Linux hands out the tile registers' state only on request, once per process.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// Tile t configured as rows[t] rows of 64 bytes (16 fp32 or 32 bf16; 0: unused), per thread,
// before its first tile instruction.
inline void configure_tile_rows(const uint8_t (&rows)[8]) {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = rows[t];
    c.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&c);
}

// Tiles 0 .. count - 1 configured as 16 rows of 64 bytes, the rest unused.
inline void configure_tiles(int count) {
  uint8_t rows[8] = {};
  for (int t = 0; t < count; ++t) rows[t] = 16;
  configure_tile_rows(rows);
}

}  // namespace tree_kernels_cpu

#endif
