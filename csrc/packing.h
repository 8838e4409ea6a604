#pragma once
#include <cstdint>
#include <vector>
namespace arkfast {
std::vector<std::vector<int64_t>> best_fit_decreasing(const int64_t* lengths, int64_t n, int64_t capacity);
}
