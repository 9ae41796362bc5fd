// SPDX-License-Identifier: MIT
// Loading and saving learned absolute position tables by the names of Hugging Face's models:
// GPT-2 `wpe.weight`, BERT / RoBERTa `embeddings.position_embeddings.weight`, OPT / BART
// `embed_positions.weight` (whose first 2 rows are not positions 0 and 1: position p reads row
// p + 2, LearnedAbsoluteEncoding's position_offset).
// IWYU pragma: private, include "posenc/io/checkpoint.hpp"
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "posenc/encoders/learned_absolute.hpp"
#include "posenc/io/detail/checkpoint_common.hpp"
#include "posenc/io/safetensors.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

/// The learned position tables of Hugging Face models whose names load_learned_absolute knows.
enum class PositionTable {
  gpt2,          // GPT2Model.wpe: wpe.weight / transformer.wpe.weight, offset 0
  bert,          // BertEmbeddings: embeddings.position_embeddings.weight / bert.…, offset 0
  roberta,       // RobertaEmbeddings (padding_idx 1): roberta.embeddings.position_embeddings.weight
                 // / embeddings.…, offset padding_idx + 1 = 2 (fairseq ids)
  opt,           // OPTLearnedPositionalEmbedding: model.decoder.embed_positions.weight /
                 // decoder.embed_positions.weight, offset 2
  bart_encoder,  // BartLearnedPositionalEmbedding: model.encoder.embed_positions.weight /
                 // encoder.embed_positions.weight, offset 2
  bart_decoder   // model.decoder.embed_positions.weight / decoder.embed_positions.weight, offset 2
};

/// The module prefixes a table of this kind has in HF state dicts, in the order tried: the
/// task model's first (GPT2LMHeadModel, BertFor…, OPTForCausalLM, BartForConditionalGeneration
/// hold the base model under transformer. / bert. / model.), then the base model's.
inline std::array<std::string_view, 2> position_table_prefixes(PositionTable table) {
  switch (table) {
    case PositionTable::gpt2:
      return {"transformer.wpe.", "wpe."};
    case PositionTable::bert:
      return {"bert.embeddings.position_embeddings.", "embeddings.position_embeddings."};
    case PositionTable::roberta:
      return {"roberta.embeddings.position_embeddings.", "embeddings.position_embeddings."};
    case PositionTable::opt:
      return {"model.decoder.embed_positions.", "decoder.embed_positions."};
    case PositionTable::bart_encoder:
      return {"model.encoder.embed_positions.", "encoder.embed_positions."};
    default:
      return {"model.decoder.embed_positions.", "decoder.embed_positions."};
  }
}

/// The row of position 0 in such a table: 2 for OPT and BART (their `offset = 2`) and RoBERTa
/// (padding_idx + 1), 0 for GPT-2 and BERT.
inline Index position_table_offset(PositionTable table) {
  return table == PositionTable::gpt2 || table == PositionTable::bert ? 0 : 2;
}

/// Loads `<prefix>weight` [rows, dim] (an nn.Embedding's table) as LearnedAbsoluteEncoding with
/// the given position_offset (the contiguous form reads row position_offset + position; explicit
/// position ids index rows directly, as HF's and fairseq's do). std::invalid_argument naming the
/// file and tensor when it is missing, not floating-point, not 2-D, or empty.
template <class T>
LearnedAbsoluteEncoding<T> load_learned_absolute(const SafetensorsFile& file,
                                                 std::string_view prefix,
                                                 Index position_offset = 0) {
  constexpr const char* fn = "posenc::io::load_learned_absolute";
  namespace ck = detail::checkpoint;
  const std::string name = ck::join(prefix, "weight");
  const TensorInfo& info = ck::float_tensor(file, name, fn);
  ck::require_shape(info.shape.size() == 2 && info.shape[0] >= 1 && info.shape[1] >= 1, file, name,
                    info, fn, "[rows, dim] (nn.Embedding(rows, dim).weight)");
  if (position_offset >= info.shape[0]) {
    io::detail::throw_format_error(fn, file.source(), io::detail::tensor_label(name), "shape ",
                                   io::detail::bracketed(info.shape),
                                   " has no row for position 0 "
                                   "at position_offset ",
                                   position_offset);
  }
  Matrix<T> table = ck::read_matrix<T>(file, name, info.shape[0], info.shape[1]);
  return ck::construct(fn, file, ck::describe(name, info), [&] {
    return LearnedAbsoluteEncoding<T>(std::move(table), position_offset);
  });
}

/// Loads the position table of an HF checkpoint of the given kind, trying
/// position_table_prefixes(table) in order, with position_table_offset(table). Throws naming
/// every name tried when none is in the file.
template <class T>
LearnedAbsoluteEncoding<T> load_learned_absolute(const SafetensorsFile& file, PositionTable table) {
  constexpr const char* fn = "posenc::io::load_learned_absolute";
  namespace ck = detail::checkpoint;
  const auto prefixes = position_table_prefixes(table);
  for (std::string_view prefix : prefixes) {
    if (file.contains(ck::join(prefix, "weight"))) {
      return load_learned_absolute<T>(file, prefix, position_table_offset(table));
    }
  }
  std::vector<std::string> tried;
  for (std::string_view prefix : prefixes) tried.push_back(ck::join(prefix, "weight"));
  ck::throw_missing(file, tried, fn);
}

/// Writes `<prefix>weight`, the whole table [rows, dim] (the offset rows included; the offset
/// itself is not stored, as in HF where it is a constant of the model class).
template <class T>
void save(SafetensorsWriter& writer, const LearnedAbsoluteEncoding<T>& encoding,
          std::string_view prefix, std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(LearnedAbsoluteEncoding)");
  writer.add(ck::join(prefix, "weight"), encoding.table(), type);
}

}  // namespace posenc::io
