// tokdrop-serve: run a tokdrop AOTInductor package (.pt2, made by tokdrop.export.to_aoti) on
// batches of token ids read as JSON lines, and write the outputs as JSON lines.
//
//   tokdrop-serve MODEL.pt2 [INPUT.jsonl | -] [--output OUT.jsonl] [--threads N]
//
// Each input line is one batch:
//   {"input_ids": [[101, 2023, 102], [101, 102]],           required; rows may differ in length
//    "attention_mask": [[1, 1, 1], [1, 1, 0]],              optional; then rows must be equal length
//    "token_type_ids": [[0, 0, 0], [0, 0, 0]]}              optional; default all 0
// Without attention_mask, ragged rows are right-padded with the model's pad id and masked. Every
// row needs a real token (no empty rows, no all-zero mask rows). Blank lines are skipped. Each output line holds one array per output of the package, keyed by
// the output names (e.g. {"last_hidden_state": [[[...]]], "pooler_output": [[...]]}).
//
// The batch size, sequence length, ids, mask and type ids are checked against the ranges the
// package was compiled for (its tokdrop.* metadata) before running: compiled code does not check.
// Lines are read straight from the stream: nothing past the package's largest batch is stored,
// and a line longer than such a batch can need is refused once that many bytes are read.
// --threads takes 1 to 4x the hardware threads.
// Exit status: 0 ok; 2 bad usage or bad input (message names the line); 3 the package cannot be
// loaded; 4 running the model failed. Errors never end in a crash.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "json_lines.hpp"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitBadInput = 2;
constexpr int kExitLoad = 3;
constexpr int kExitRun = 4;

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct PackageInfo {
  int64_t min_batch = 1, max_batch = 1, min_seq = 1, max_seq = 1;
  int64_t vocab_size = 0, type_vocab_size = 1, pad_id = 0;
  std::vector<std::string> inputs, outputs;
  std::string head;
};

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep))
    if (!part.empty()) parts.push_back(part);
  return parts;
}

PackageInfo read_info(const std::unordered_map<std::string, std::string>& meta, const std::string& path) {
  auto get = [&](const std::string& key) -> std::string {
    auto it = meta.find(key);
    if (it == meta.end())
      throw std::runtime_error(path + " is not a tokdrop package: its metadata lacks " + key +
                               " (export it with tokdrop.export.to_aoti / `tokdrop export --format aoti`)");
    return it->second;
  };
  auto get_int = [&](const std::string& key) -> int64_t {
    std::string text = get(key);
    try {
      size_t used = 0;
      long long value = std::stoll(text, &used);
      if (used != text.size()) throw std::invalid_argument(text);
      return value;
    } catch (const std::exception&) {
      throw std::runtime_error(path + ": metadata " + key + "=" + text + " is not an integer");
    }
  };
  PackageInfo info;
  info.min_batch = get_int("tokdrop.min_batch");
  info.max_batch = get_int("tokdrop.max_batch");
  info.min_seq = get_int("tokdrop.min_seq_len");
  info.max_seq = get_int("tokdrop.max_seq_len");
  info.vocab_size = get_int("tokdrop.vocab_size");
  info.type_vocab_size = get_int("tokdrop.type_vocab_size");
  info.pad_id = get_int("tokdrop.pad_token_id");
  info.inputs = split(get("tokdrop.inputs"), ',');
  info.outputs = split(get("tokdrop.outputs"), ',');
  info.head = get("tokdrop.head");
  if (info.inputs.size() != 3 || info.outputs.empty())
    throw std::runtime_error(path + ": unexpected tokdrop.inputs/outputs metadata");
  if (info.min_batch < 1 || info.max_batch < info.min_batch || info.min_seq < 1 || info.max_seq < info.min_seq ||
      info.vocab_size < 1 || info.type_vocab_size < 1 || info.pad_id < 0 || info.pad_id >= info.vocab_size)
    throw std::runtime_error(path + ": inconsistent tokdrop.* ranges in its metadata");
  return info;
}

using Rows = std::vector<std::vector<int64_t>>;
using tokdrop::json::Kind;
using tokdrop::json::LineReader;

std::string range_text(int64_t low, int64_t high) {
  return "[" + std::to_string(low) + ", " + std::to_string(high) + "]";
}

// The longest line a batch within the package's ranges can need: three arrays of max_batch rows
// of max_seq integers, 24 bytes each (20 digits, a sign, ", "), and room for keys and spaces.
uint64_t max_line_bytes(const PackageInfo& info) {
  constexpr uint64_t kLimit = uint64_t{1} << 40;
  uint64_t row = std::min<uint64_t>(static_cast<uint64_t>(info.max_seq), kLimit) * 24 + 8;
  uint64_t arrays = 3 * std::min<uint64_t>(static_cast<uint64_t>(info.max_batch), kLimit / row + 1);
  return std::min(kLimit, arrays * row + 4096);
}

std::string cell(const std::string& name, size_t row, size_t column) {
  return name + "[" + std::to_string(row) + "][" + std::to_string(column) + "]";
}

// `name`'s array of rows of integers. No more than the package's largest batch of rows of its
// longest sequence is stored: past either, the rest is only counted for the message.
Rows read_rows(LineReader& reader, const std::string& name, const PackageInfo& info) {
  const auto max_batch = static_cast<size_t>(info.max_batch);
  const auto max_seq = static_cast<size_t>(info.max_seq);
  Kind kind = reader.peek_kind();
  if (kind != Kind::Array)
    throw BadInput(name + " must be an array of rows (arrays of integers), got " + kind_name(kind));
  Rows rows;
  if (reader.open_empty('[', ']')) return rows;
  size_t count = 0, length = 0;
  try {
    do {
      const size_t r = count++;
      Kind row_kind = reader.peek_kind();
      if (row_kind != Kind::Array)
        throw BadInput(name + "[" + std::to_string(r) + "] must be an array of integers, got " + kind_name(row_kind));
      std::vector<int64_t> row;
      length = 0;
      if (!reader.open_empty('[', ']')) {
        do {
          Kind value_kind = reader.peek_kind();
          if (value_kind != Kind::Integer)
            throw BadInput(cell(name, r, length) + " must be an integer, got " + kind_name(value_kind));
          int64_t value = reader.read_integer();
          if (r < max_batch && length < max_seq) row.push_back(value);
          ++length;
        } while (reader.more(']'));
      }
      if (length > max_seq)
        throw BadInput("sequence length " + std::to_string(length) + " is outside the package's range " +
                       range_text(info.min_seq, info.max_seq) + " (" + name + "[" + std::to_string(r) + "] has " +
                       std::to_string(length) + " values)");
      if (r < max_batch) rows.push_back(std::move(row));
    } while (reader.more(']'));
  } catch (const tokdrop::json::LineTooLong& err) {
    // Say what made the line that long, where it is known.
    std::string stopped = "; reading stopped: " + std::string(err.what()) + ")";
    if (length > max_seq)
      throw BadInput("sequence length of at least " + std::to_string(length) + " is outside the package's range " +
                     range_text(info.min_seq, info.max_seq) + " (" + name + "[" + std::to_string(count - 1) + "]" +
                     stopped);
    if (count > max_batch)
      throw BadInput("batch size of at least " + std::to_string(count) + " is outside the package's range " +
                     range_text(info.min_batch, info.max_batch) + " (" + name + stopped);
    throw;
  }
  if (count > max_batch)
    throw BadInput("batch size " + std::to_string(count) + " is outside the package's range " +
                   range_text(info.min_batch, info.max_batch) + " (" + name + " has " + std::to_string(count) +
                   " rows)");
  return rows;
}

struct Fields {
  Rows ids, mask, types;
  bool has_ids = false, has_mask = false, has_types = false;
};

// One line's object, read straight from the stream.
Fields read_fields(LineReader& reader, const PackageInfo& info) {
  Kind kind = reader.peek_kind();
  if (kind != Kind::Object) {
    reader.skip_value();  // a JSON error in it comes first
    throw BadInput(std::string("each line must be a JSON object with \"input_ids\", got ") + kind_name(kind));
  }
  Fields fields;
  if (!reader.open_empty('{', '}')) {
    do {
      if (reader.peek() != '"') reader.fail("expected a string key");
      std::string key = reader.read_string();
      reader.expect(':');
      auto [rows, seen] = key == "input_ids"        ? std::pair{&fields.ids, &fields.has_ids}
                          : key == "attention_mask" ? std::pair{&fields.mask, &fields.has_mask}
                          : key == "token_type_ids" ? std::pair{&fields.types, &fields.has_types}
                                                    : std::pair<Rows*, bool*>{nullptr, nullptr};
      if (rows == nullptr)
        throw BadInput("unknown key \"" + key + "\" (expected input_ids, attention_mask, token_type_ids)");
      if (*seen) reader.fail("duplicate key \"" + key + "\"");
      *seen = true;
      *rows = read_rows(reader, key, info);
    } while (reader.more('}'));
  }
  reader.finish_line();
  if (!fields.has_ids) throw BadInput("missing \"input_ids\"");
  return fields;
}

struct Batch {
  at::Tensor input_ids, attention_mask, token_type_ids;
};

// The checks the Python API makes, then the padded tensors.
Batch make_batch(const Fields& fields, const PackageInfo& info) {
  const Rows& ids = fields.ids;
  const Rows& mask = fields.mask;
  const Rows& types = fields.types;
  const int64_t batch = static_cast<int64_t>(ids.size());
  if (batch < info.min_batch || batch > info.max_batch)
    throw BadInput("batch size " + std::to_string(batch) + " is outside the package's range " +
                   range_text(info.min_batch, info.max_batch));
  int64_t seq = 0;
  for (const auto& row : ids) seq = std::max<int64_t>(seq, static_cast<int64_t>(row.size()));
  if (seq < info.min_seq || seq > info.max_seq)
    throw BadInput("sequence length " + std::to_string(seq) + " is outside the package's range " +
                   range_text(info.min_seq, info.max_seq));
  for (size_t r = 0; r < ids.size(); ++r)
    if (ids[r].empty()) throw BadInput("input_ids[" + std::to_string(r) + "] is empty: every row needs a token");
  auto same_shape = [&](const Rows& other, const std::string& name) {
    if (other.size() != ids.size())
      throw BadInput(name + " has " + std::to_string(other.size()) + " rows, input_ids has " +
                     std::to_string(ids.size()));
    for (size_t r = 0; r < ids.size(); ++r)
      if (other[r].size() != ids[r].size())
        throw BadInput(name + "[" + std::to_string(r) + "] has " + std::to_string(other[r].size()) +
                       " values, input_ids[" + std::to_string(r) + "] has " + std::to_string(ids[r].size()));
  };
  if (fields.has_mask) {
    same_shape(mask, "attention_mask");
    for (size_t r = 0; r < ids.size(); ++r)
      if (static_cast<int64_t>(ids[r].size()) != seq)
        throw BadInput("with attention_mask given, every row must have the same length; input_ids[" +
                       std::to_string(r) + "] has " + std::to_string(ids[r].size()) + ", the longest " +
                       std::to_string(seq));
  }
  if (fields.has_types) same_shape(types, "token_type_ids");

  Batch out;
  auto options = at::TensorOptions().dtype(at::kLong);
  out.input_ids = at::full({batch, seq}, info.pad_id, options);
  out.attention_mask = at::zeros({batch, seq}, options);
  out.token_type_ids = at::zeros({batch, seq}, options);
  auto ids_a = out.input_ids.accessor<int64_t, 2>();
  auto mask_a = out.attention_mask.accessor<int64_t, 2>();
  auto types_a = out.token_type_ids.accessor<int64_t, 2>();
  for (int64_t r = 0; r < batch; ++r) {
    bool padding = false;
    for (int64_t c = 0; c < static_cast<int64_t>(ids[r].size()); ++c) {
      int64_t id = ids[r][c];
      if (id < 0 || id >= info.vocab_size)
        throw BadInput(cell("input_ids", r, c) + " = " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(info.vocab_size) + ")");
      ids_a[r][c] = id;
      int64_t m = fields.has_mask ? mask[r][c] : 1;
      if (m != 0 && m != 1)
        throw BadInput(cell("attention_mask", r, c) + " = " + std::to_string(m) + "; the mask holds only 0 and 1");
      if (m == 1 && padding)
        throw BadInput("attention_mask[" + std::to_string(r) + "] is not right-padded (a 1 after a 0)");
      padding = padding || m == 0;
      mask_a[r][c] = m;
      if (fields.has_types) {
        int64_t t = types[r][c];
        if (t < 0 || t >= info.type_vocab_size)
          throw BadInput(cell("token_type_ids", r, c) + " = " + std::to_string(t) + " is outside [0, " +
                         std::to_string(info.type_vocab_size) + ")");
        types_a[r][c] = t;
      }
    }
    if (mask_a[r][0] == 0)
      throw BadInput("attention_mask[" + std::to_string(r) + "] is all zeros: every row needs a real token");
  }
  return out;
}

void append_tensor(std::string& out, const float* data, const std::vector<int64_t>& sizes, size_t dim,
                   size_t& offset) {
  out.push_back('[');
  for (int64_t i = 0; i < sizes[dim]; ++i) {
    if (i) out.push_back(',');
    if (dim + 1 == sizes.size()) {
      tokdrop::json::append_float(out, data[offset++]);
    } else {
      append_tensor(out, data, sizes, dim + 1, offset);
    }
  }
  out.push_back(']');
}

std::string to_json(const std::vector<at::Tensor>& outputs, const PackageInfo& info) {
  std::string out = "{";
  for (size_t i = 0; i < outputs.size(); ++i) {
    at::Tensor t = outputs[i].to(at::kFloat).contiguous();
    if (i) out += ",";
    std::string name = i < info.outputs.size() ? info.outputs[i] : "output_" + std::to_string(i);
    out += "\"" + name + "\":";
    std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
    size_t offset = 0;
    if (sizes.empty()) {
      tokdrop::json::append_float(out, t.data_ptr<float>()[0]);
    } else {
      append_tensor(out, t.data_ptr<float>(), sizes, 0, offset);
    }
  }
  out += "}\n";
  return out;
}

// More threads than this only oversubscribe the cores; far more exhaust the OpenMP runtime.
constexpr int kThreadsPerHardwareThread = 4;

// A whole decimal integer in [1, 4 x hardware threads], or 0 with `error` set.
int parse_threads(const std::string& text, std::string& error) {
  const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int most = kThreadsPerHardwareThread * hardware;
  int value = 0;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || err != std::errc() || end != text.data() + text.size() || value < 1 || value > most) {
    error = "--threads needs an integer from 1 to " + std::to_string(most) + " (" +
            std::to_string(kThreadsPerHardwareThread) + " x the " + std::to_string(hardware) +
            " hardware threads), got '" + text + "'";
    return 0;
  }
  return value;
}

void usage(std::ostream& os) {
  os << "usage: tokdrop-serve MODEL.pt2 [INPUT.jsonl | -] [--output OUT.jsonl] [--threads N]\n"
        "Runs a tokdrop AOTInductor package on JSON-lines batches of token ids (stdin by default).\n"
        "Each line: {\"input_ids\": [[...], ...], \"attention_mask\": [[...]] (optional), "
        "\"token_type_ids\": [[...]] (optional)}\n";
}

int run(int argc, char** argv) {
  // Input is read a character at a time from the stream buffer: unsynchronised, that is fast.
  std::ios::sync_with_stdio(false);
  std::vector<std::string> positional;
  std::string output_path;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      usage(std::cout);
      return kExitOk;
    } else if (arg == "--output" || arg == "-o" || arg == "--threads") {
      if (i + 1 >= argc) {
        std::cerr << "tokdrop-serve: " << arg << " needs a value\n";
        return kExitBadInput;
      }
      std::string value = argv[++i];
      if (arg == "--threads") {
        std::string error;
        threads = parse_threads(value, error);
        if (threads == 0) {
          std::cerr << "tokdrop-serve: " << error << "\n";
          return kExitBadInput;
        }
      } else {
        output_path = value;
      }
    } else if (arg.size() > 1 && arg[0] == '-') {
      std::cerr << "tokdrop-serve: unknown option " << arg << "\n";
      usage(std::cerr);
      return kExitBadInput;
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.empty() || positional.size() > 2) {
    usage(std::cerr);
    return kExitBadInput;
  }
  const std::string package = positional[0];
  const std::string input_path = positional.size() > 1 ? positional[1] : "-";

  std::error_code ec;
  if (!std::filesystem::is_regular_file(package, ec)) {
    std::cerr << "tokdrop-serve: model package " << package
              << (std::filesystem::exists(package, ec) ? " is not a file" : " does not exist") << "\n";
    return kExitLoad;
  }
  std::ifstream input_file;
  if (input_path != "-") {
    if (std::filesystem::is_directory(input_path, ec)) {
      std::cerr << "tokdrop-serve: cannot open input " << input_path << ": it is a directory\n";
      return kExitBadInput;
    }
    input_file.open(input_path, std::ios::binary);
    if (!input_file) {
      std::cerr << "tokdrop-serve: cannot open input " << input_path << "\n";
      return kExitBadInput;
    }
  }
  std::istream& in = input_path == "-" ? std::cin : input_file;
  const std::string input_name = input_path == "-" ? "stdin" : input_path;
  std::ofstream output_file;
  if (!output_path.empty()) {
    output_file.open(output_path, std::ios::binary | std::ios::trunc);
    if (!output_file) {
      std::cerr << "tokdrop-serve: cannot write output " << output_path << "\n";
      return kExitBadInput;
    }
  }
  std::ostream& out = output_path.empty() ? std::cout : output_file;
  if (threads > 0) at::set_num_threads(threads);

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  PackageInfo info;
  try {
    // Metadata first: refuse a package that is not ours before loading its shared library.
    auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
    info = read_info(meta, package);
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
  } catch (const c10::Error& err) {
    std::cerr << "tokdrop-serve: cannot load " << package << ": " << err.what_without_backtrace() << "\n";
    return kExitLoad;
  } catch (const std::exception& err) {
    std::cerr << "tokdrop-serve: cannot load " << package << ": " << err.what() << "\n";
    return kExitLoad;
  }

  c10::InferenceMode guard;
  LineReader reader(in, max_line_bytes(info));
  while (true) {
    uint64_t line_no = reader.line();
    Batch batch;
    try {
      if (!reader.next_line()) break;
      line_no = reader.line();
      batch = make_batch(read_fields(reader, info), info);
    } catch (const tokdrop::json::JsonError& err) {
      std::cerr << "tokdrop-serve: " << input_name << " line " << line_no << ": invalid JSON: " << err.what() << "\n";
      return kExitBadInput;
    } catch (const tokdrop::json::LineTooLong& err) {
      std::cerr << "tokdrop-serve: " << input_name << " line " << line_no << ": " << err.what()
                << ", more than a batch within the package's ranges (batch size <= " << info.max_batch
                << ", sequence length <= " << info.max_seq << ") can need\n";
      return kExitBadInput;
    } catch (const BadInput& err) {
      std::cerr << "tokdrop-serve: " << input_name << " line " << line_no << ": " << err.what() << "\n";
      return kExitBadInput;
    }
    std::vector<at::Tensor> outputs;
    try {
      outputs = loader->run({batch.input_ids, batch.attention_mask, batch.token_type_ids});
      out << to_json(outputs, info);
    } catch (const c10::Error& err) {
      std::cerr << "tokdrop-serve: line " << line_no << ": running the model failed: "
                << err.what_without_backtrace() << "\n";
      return kExitRun;
    } catch (const std::exception& err) {
      std::cerr << "tokdrop-serve: line " << line_no << ": running the model failed: " << err.what() << "\n";
      return kExitRun;
    }
    out.flush();
    if (!out) {
      std::cerr << "tokdrop-serve: writing the output failed\n";
      return kExitRun;
    }
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& err) {
    std::cerr << "tokdrop-serve: error: " << err.what_without_backtrace() << "\n";
  } catch (const std::exception& err) {
    std::cerr << "tokdrop-serve: error: " << err.what() << "\n";
  } catch (...) {
    std::cerr << "tokdrop-serve: unknown error\n";
  }
  return kExitRun;
}
