// Helpers shared by the 1- and 2-bit kernel bodies. Passed to mx.fast.metal_kernel as
// `header`, so they sit above the generated kernel signature.
//
// Weight layout (MLX affine quantization, bits = 1 or 2): row n of W is K codes packed
// least-significant bits first into K * BITS / 32 uint32 words, and one scale and one bias
// per GROUP_SIZE consecutive codes, so w[n, k] = scales[n, k / GROUP_SIZE] * code + biases[...].

constant constexpr int LOWBIT_SIMD_WIDTH = 32;

// Accumulates this lane's share of x[m, :] . dequant(w_row) into acc[m] for m < M.
// Lane `lane` takes packed words lane, lane + 32, lane + 64, ... of the row. A word contains
// 32 / BITS codes, and because GROUP_SIZE is a multiple of 32 every word lies inside one
// group, so one scale and one bias apply to the whole word. Lanes whose next word is past
// the end of the row stop early, which handles K that is not a multiple of the 32-word block.
template <typename T, int M, int BITS, int GROUP_SIZE>
inline void lowbit_accumulate_row(
    const device T* x,
    int K,
    const device uint32_t* w_row,
    const device T* scales_row,
    const device T* biases_row,
    uint lane,
    thread float* acc) {
  constexpr int VALUES_PER_WORD = 32 / BITS;
  constexpr uint32_t CODE_MASK = (1u << BITS) - 1u;
  const int words_per_row = K / VALUES_PER_WORD;

  for (int word = int(lane); word < words_per_row; word += LOWBIT_SIMD_WIDTH) {
    const uint32_t packed = w_row[word];
    const int k0 = word * VALUES_PER_WORD;
    const int group = k0 / GROUP_SIZE;
    const float scale = float(scales_row[group]);
    const float bias = float(biases_row[group]);

    for (int m = 0; m < M; ++m) {
      const device T* x_chunk = x + m * K + k0;
      float dot = 0.0f;
      float x_sum = 0.0f;
      for (int j = 0; j < VALUES_PER_WORD; ++j) {
        const float xv = float(x_chunk[j]);
        const uint32_t code = (packed >> (j * BITS)) & CODE_MASK;
        dot += xv * float(code);
        x_sum += xv;
      }
      // sum_j x_j * (scale * code_j + bias) = scale * dot + bias * sum_j x_j
      acc[m] += scale * dot + bias * x_sum;
    }
  }
}
