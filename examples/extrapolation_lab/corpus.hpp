// SPDX-License-Identifier: MIT
// The lab's corpus: every *.py file under a directory (by default Debian's libpython3.11-stdlib,
// /usr/lib/python3.11), split into train and held-out files by a hash of the path, and a seeded
// sampler of training windows. Bytes are the tokens (vocabulary 256).
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <posenc/tensor.hpp>

namespace lab {

using posenc::Index;

/// The default corpus: the Python standard library as Debian ships it (libpython3.11-stdlib).
inline constexpr std::string_view default_corpus_path = "/usr/lib/python3.11";

/// Thrown when the corpus directory is missing or holds no *.py file (the lab exits with 2).
struct CorpusError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// 64-bit FNV-1a of `text` (Fowler, Noll, Vo): the split must not depend on the standard
/// library's std::hash.
inline std::uint64_t fnv1a(std::string_view text) {
  std::uint64_t hash = 0xcbf29ce484222325ull;
  for (const char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ull;
  }
  return hash;
}

/// Whether a file goes to the held-out set: FNV-1a of its path relative to the corpus root
/// ("json/decoder.py"), modulo 100, below `held_out_percent`. Independent of where the corpus is
/// mounted and of the order the directory is listed in.
inline bool is_held_out(std::string_view relative_path, int held_out_percent = 10) {
  return fnv1a(relative_path) % 100 < static_cast<std::uint64_t>(held_out_percent);
}

/// Train and held-out bytes: the files of each set concatenated in sorted path order.
struct Corpus {
  std::filesystem::path root;
  std::vector<std::uint8_t> train;
  std::vector<std::uint8_t> held_out;
  Index train_files = 0;
  Index held_out_files = 0;
};

/// Reads every *.py file under `root` (recursively, symlinked directories not followed).
/// Throws CorpusError naming the path (and the Debian package) when `root` is not a directory,
/// holds no *.py file, or one of the two sets comes out empty.
inline Corpus load_corpus(const std::filesystem::path& root, int held_out_percent = 10) {
  namespace fs = std::filesystem;
  const std::string hint =
      root == fs::path(default_corpus_path)
          ? " (Debian: apt-get install libpython3.11-stdlib, or pass --corpus DIR)"
          : " (pass --corpus DIR with *.py files)";
  std::error_code error;
  if (!fs::is_directory(root, error)) {
    throw CorpusError("corpus directory " + root.string() + " does not exist" + hint);
  }
  std::vector<std::string> files;  // relative paths, generic separators
  for (auto it = fs::recursive_directory_iterator(
           root, fs::directory_options::skip_permission_denied, error);
       !error && it != fs::recursive_directory_iterator(); it.increment(error)) {
    if (it->is_regular_file(error) && it->path().extension() == ".py") {
      files.push_back(fs::relative(it->path(), root).generic_string());
    }
  }
  if (error) throw CorpusError("cannot list " + root.string() + ": " + error.message());
  std::sort(files.begin(), files.end());
  Corpus corpus{root, {}, {}, 0, 0};
  for (const std::string& file : files) {
    std::ifstream in(root / file, std::ios::binary);
    if (!in) throw CorpusError("cannot read " + (root / file).string());
    std::vector<std::uint8_t>& set =
        is_held_out(file, held_out_percent) ? corpus.held_out : corpus.train;
    set.insert(set.end(), std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    ++(is_held_out(file, held_out_percent) ? corpus.held_out_files : corpus.train_files);
  }
  if (files.empty()) throw CorpusError("no *.py file under " + root.string() + hint);
  if (corpus.train.size() < 4096 || corpus.held_out.size() < 1024) {
    throw CorpusError("corpus " + root.string() +
                      " is too small: " + std::to_string(corpus.train.size()) + " train and " +
                      std::to_string(corpus.held_out.size()) + " held-out bytes");
  }
  return corpus;
}

/// Seeded sampler of training windows: each batch is `batch` windows of `length` + 1 consecutive
/// bytes at uniform random offsets of the train text; inputs are bytes 0 … length−1 of a window,
/// targets bytes 1 … length. The same seed gives the same batches, whatever the encoding.
class BatchSampler {
 public:
  BatchSampler(const std::vector<std::uint8_t>& text, Index batch, Index length, std::uint64_t seed)
      : text_(&text),
        batch_(batch),
        length_(length),
        rng_(seed),
        inputs_(static_cast<std::size_t>(batch * length)),
        targets_(static_cast<std::size_t>(batch * length)) {
    if (static_cast<Index>(text.size()) <= length + 1) {
      throw std::invalid_argument("lab::BatchSampler: text shorter than one window");
    }
  }

  /// Draws the next batch into inputs() and targets(), both (B, T) row-major.
  void next() {
    // Offsets from the raw 64-bit draws (std::uniform_int_distribution is not specified
    // bit-for-bit across standard libraries); the modulo bias is below 2^-40 here.
    const auto range =
        static_cast<std::uint64_t>(text_->size()) - static_cast<std::uint64_t>(length_) - 1;
    for (Index b = 0; b < batch_; ++b) {
      const auto start = static_cast<std::size_t>(rng_() % range);
      for (Index t = 0; t < length_; ++t) {
        const auto i = static_cast<std::size_t>(b * length_ + t);
        inputs_[i] = (*text_)[start + static_cast<std::size_t>(t)];
        targets_[i] = (*text_)[start + static_cast<std::size_t>(t) + 1];
      }
    }
  }

  const std::vector<int>& inputs() const { return inputs_; }
  const std::vector<int>& targets() const { return targets_; }

 private:
  const std::vector<std::uint8_t>* text_;
  Index batch_;
  Index length_;
  std::mt19937_64 rng_;
  std::vector<int> inputs_;
  std::vector<int> targets_;
};

}  // namespace lab
