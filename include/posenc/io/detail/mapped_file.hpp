// SPDX-License-Identifier: MIT
// The read-only bytes of a whole file: memory-mapped on POSIX systems, read into memory where
// mapping is unavailable or fails (an empty file, a pipe, a file system without mmap), or owned
// bytes handed over by the caller.
// IWYU pragma: private, include "posenc/io/safetensors.hpp"
#pragma once

#include <cerrno>
#include <cstddef>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define POSENC_IO_POSIX 1
#else
#include <fstream>
#include <iterator>
#define POSENC_IO_POSIX 0
#endif

namespace posenc::io::detail {

/// Throws std::runtime_error("<function>: '<path>': <what>").
[[noreturn]] inline void throw_file_error(const char* function, const std::string& path,
                                          const std::string& what) {
  std::ostringstream message;
  message << function << ": '" << path << "': " << what;
  throw std::runtime_error(message.str());
}

/// A file's bytes, move-only. While a mapping is alive the file must not be truncated by anyone
/// (reading a page past the new end raises SIGBUS); it may be deleted or renamed.
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept { swap(other); }
  MappedFile& operator=(MappedFile&& other) noexcept {
    MappedFile(std::move(other)).swap(*this);
    return *this;
  }
  ~MappedFile() { unmap(); }

  /// Maps (or reads) the file at `path`; std::runtime_error naming `function` and the path when
  /// it cannot be opened or read.
  static MappedFile open(const std::string& path, const char* function) {
    MappedFile file;
#if POSENC_IO_POSIX
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_file_error(function, path, "cannot open: " + errno_message());
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat status {};
    if (::fstat(fd, &status) != 0)
      throw_file_error(function, path, "cannot stat: " + errno_message());
    if (S_ISDIR(status.st_mode)) throw_file_error(function, path, "is a directory");
    if (S_ISREG(status.st_mode) && status.st_size > 0) {
      const auto size = static_cast<std::size_t>(status.st_size);
      void* address = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (address != MAP_FAILED) {
        file.mapping_ = static_cast<const unsigned char*>(address);
        file.size_ = size;
        return file;
      }
    }
    // Not mappable: read it.
    std::vector<unsigned char> bytes;
    unsigned char chunk[1 << 16];
    for (;;) {
      const ::ssize_t got = ::read(fd, chunk, sizeof chunk);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw_file_error(function, path, "cannot read: " + errno_message());
      if (got == 0) break;
      bytes.insert(bytes.end(), chunk, chunk + got);
    }
#else
    std::ifstream in(path, std::ios::binary);
    if (!in) throw_file_error(function, path, "cannot open");
    std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                     std::istreambuf_iterator<char>());
    if (in.bad()) throw_file_error(function, path, "cannot read");
#endif
    return from_bytes(std::move(bytes));
  }

  /// Takes ownership of bytes already in memory.
  static MappedFile from_bytes(std::vector<unsigned char> bytes) {
    MappedFile file;
    file.owned_ = std::move(bytes);
    file.size_ = file.owned_.size();
    return file;
  }

  std::span<const unsigned char> bytes() const {
    return {mapping_ != nullptr ? mapping_ : owned_.data(), size_};
  }
  /// Whether the bytes are a memory mapping of the file (rather than a copy in memory).
  bool mapped() const { return mapping_ != nullptr; }

 private:
  static std::string errno_message() { return std::generic_category().message(errno); }

  void swap(MappedFile& other) noexcept {
    std::swap(mapping_, other.mapping_);
    std::swap(size_, other.size_);
    owned_.swap(other.owned_);
  }
  void unmap() noexcept {
#if POSENC_IO_POSIX
    if (mapping_ != nullptr) ::munmap(const_cast<unsigned char*>(mapping_), size_);
#endif
    mapping_ = nullptr;
  }

  const unsigned char* mapping_ = nullptr;
  std::size_t size_ = 0;
  std::vector<unsigned char> owned_;
};

}  // namespace posenc::io::detail
