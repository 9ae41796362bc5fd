// SPDX-License-Identifier: MIT
// Must NOT compile (CTest test layout.linear_attention_rejects_score_bias): linear attention
// applies only a QueryKeyTransform, so an encoder composed of RoPE and an ALiBi bias is rejected
// at compile time with a message naming the ScoreBias stage, instead of losing the bias silently.
#include <posenc/posenc.hpp>

int main() {
  using namespace posenc;
  Heads<float> q(8, 4, 64), k(8, 4, 64), v(8, 4, 64);
  const auto encoder = compose(RotaryEncoding<float>(64), Alibi<float>(8));
  const Heads<float> out = linear_attention(q, k, v, EluPlusOne{}, encoder);
  return out.heads() == 8 ? 0 : 1;
}
