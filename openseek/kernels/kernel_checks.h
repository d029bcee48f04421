// Checks at the kernels' boundary that both extensions share. Called through torch.ops.openseek.* a kernel can be
// handed any tensors; a wrong length or order here would make it read or write outside its buffers.
#pragma once
#include <torch/extension.h>

// ends [G] int64: cumulative row counts of G groups (rows sorted by group), so non-negative, non-decreasing and
// ending at the number of rows.
inline void check_group_ends(const int64_t* ends, int64_t groups, int64_t rows, const char* what) {
  int64_t previous = 0;
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(ends[g] >= previous, "ends[", g, "] = ", ends[g], " is below ", previous,
                ": ends must be non-decreasing cumulative counts of ", what, " from 0");
    previous = ends[g];
  }
  TORCH_CHECK(groups == 0 || previous == rows, "ends[-1] must equal the number of ", what, " (", rows, "), got ",
              previous);
}

// A per-output-channel vector (scales, row sums): [N] of one dtype, contiguous.
inline void check_channel_vector(const torch::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous(), name, " must be a "
              "contiguous [", n, "] ", c10::toString(dtype), " vector, got ", t.sizes(), " ", t.scalar_type());
}
