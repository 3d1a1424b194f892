// Streaming reading of JSON lines for tokdrop-serve (one JSON value per line, read straight from
// the stream with nothing of it kept but what the caller stores), and a writer for float arrays.
//
// Hostile input cannot make it use much memory or time: a line may hold at most a given number of
// bytes (reading stops there), keys and skipped strings are not stored, nesting is limited (no
// stack exhaustion), numbers must be integers in the int64 range. Every error is a JsonError with
// the byte column where it happened. Not a general-purpose library.
#pragma once

#include <charconv>
#include <cstdint>
#include <istream>
#include <limits>
#include <stdexcept>
#include <string>

namespace tokdrop::json {

class JsonError : public std::runtime_error {
 public:
  JsonError(const std::string& what, uint64_t column)
      : std::runtime_error(what + " (at column " + std::to_string(column + 1) + ")") {}
};

// The line is longer than the reader allows.
class LineTooLong : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Kind { Null, Bool, Integer, String, Array, Object };

inline const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::Null: return "null";
    case Kind::Bool: return "a boolean";
    case Kind::Integer: return "an integer";
    case Kind::String: return "a string";
    case Kind::Array: return "an array";
    case Kind::Object: return "an object";
  }
  return "?";
}

// Reads one line of a stream at a time; '\n' (or the end of the stream) ends a line.
class LineReader {
 public:
  static constexpr int kMaxDepth = 8;
  static constexpr size_t kMaxStringBytes = 256;
  static constexpr int kEnd = std::char_traits<char>::eof();

  LineReader(std::istream& in, uint64_t max_line_bytes) : buffer_(*in.rdbuf()), max_line_bytes_(max_line_bytes) {}

  // Starts the next line: skips blank lines; false at the end of the stream.
  bool next_line() {
    while (true) {
      column_ = 0;
      skip_space();
      int c = buffer_.sgetc();
      if (c == kEnd) return false;
      if (c != '\n') return true;
      buffer_.sbumpc();
      ++line_;
    }
  }

  // The line being read, counted from 1 (blank lines included).
  uint64_t line() const { return line_ + 1; }

  // Ends the current line: only spaces may follow the value.
  void finish_line() {
    skip_space();
    int c = buffer_.sgetc();
    if (c != kEnd && c != '\n') fail("unexpected text after the JSON value");
    if (c == '\n') buffer_.sbumpc();
    ++line_;
  }

  [[noreturn]] void fail(const std::string& what) const { throw JsonError(what, column_); }

  // The kind of the next value, from its first character (not consumed).
  Kind peek_kind() {
    int c = peek();
    switch (c) {
      case '{': return Kind::Object;
      case '[': return Kind::Array;
      case '"': return Kind::String;
      case 't': case 'f': return Kind::Bool;
      case 'n': return Kind::Null;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return Kind::Integer;
        fail(c == '\n' ? "unexpected end of line" : std::string("unexpected character '") + char(c) + "'");
    }
  }

  // The next non-space character of the line, not consumed ('\n' at its end).
  int peek() {
    skip_space();
    int c = buffer_.sgetc();
    return c == kEnd ? '\n' : c;
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    take();
  }

  // After a container's element: true if another follows (consumes ',' or `close`).
  bool more(char close) {
    int c = peek();
    if (c == ',') {
      take();
      return true;
    }
    if (c == close) {
      take();
      return false;
    }
    fail(std::string("expected ',' or '") + close + "'");
  }

  // Consumes `open`; true if the container is empty (its `close` consumed too).
  bool open_empty(char open, char close) {
    expect(open);
    if (peek() != close) return false;
    take();
    return true;
  }

  int64_t read_integer() {
    peek();
    uint64_t start = column_;
    std::string digits;  // at most the 20 characters of an int64, checked as they come
    if (buffer_.sgetc() == '-') digits.push_back(static_cast<char>(take()));
    while (true) {
      int c = buffer_.sgetc();
      if (c < '0' || c > '9') break;
      if (digits.size() > 20) {
        column_ = start;
        fail("integer out of the int64 range");
      }
      digits.push_back(static_cast<char>(take()));
    }
    size_t first = digits[0] == '-' ? 1 : 0;
    if (digits.size() == first) fail("invalid number");
    int c = buffer_.sgetc();
    if (c == '.' || c == 'e' || c == 'E') fail("numbers must be integers (token ids, mask and type values)");
    if (digits[first] == '0' && digits.size() - first > 1) fail("invalid number (leading zero)");
    int64_t out = 0;
    auto [end, err] = std::from_chars(digits.data(), digits.data() + digits.size(), out);
    if (err != std::errc() || end != digits.data() + digits.size()) {
      column_ = start;
      fail("integer out of the int64 range");
    }
    return out;
  }

  // A string of at most kMaxStringBytes (object keys); longer ones are an error.
  std::string read_string() { return string_value(true); }

  // Reads past the next value, whatever it is; returns its kind.
  Kind skip_value(int depth = 0) {
    if (depth > kMaxDepth) fail("JSON nested too deeply");
    Kind kind = peek_kind();
    switch (kind) {
      case Kind::Object:
        if (open_empty('{', '}')) break;
        do {
          if (peek() != '"') fail("expected a string key");
          string_value(false);
          expect(':');
          skip_value(depth + 1);
        } while (more('}'));
        break;
      case Kind::Array:
        if (open_empty('[', ']')) break;
        do skip_value(depth + 1);
        while (more(']'));
        break;
      case Kind::String: string_value(false); break;
      case Kind::Bool: literal(peek() == 't' ? "true" : "false"); break;
      case Kind::Null: literal("null"); break;
      case Kind::Integer: read_integer(); break;
    }
    return kind;
  }

 private:
  std::streambuf& buffer_;
  const uint64_t max_line_bytes_;
  uint64_t line_ = 0;
  uint64_t column_ = 0;

  int take() {
    if (column_ >= max_line_bytes_)
      throw LineTooLong("the line is longer than " + std::to_string(max_line_bytes_) + " bytes");
    ++column_;
    return buffer_.sbumpc();
  }

  void skip_space() {
    while (true) {
      int c = buffer_.sgetc();
      if (c != ' ' && c != '\t' && c != '\r') return;
      take();
    }
  }

  void literal(const char* word) {
    for (const char* p = word; *p; ++p) {
      if (buffer_.sgetc() != *p) fail("invalid literal");
      take();
    }
  }

  std::string string_value(bool keep) {
    expect('"');
    std::string out;
    while (true) {
      int c = buffer_.sgetc();
      if (c == kEnd || c == '\n') fail("unterminated string");
      take();
      if (c == '"') break;
      if (c < 0x20) fail("control character in string");
      if (c == '\\') {
        int e = buffer_.sgetc();
        if (e == kEnd || e == '\n') fail("unterminated string");
        take();
        switch (e) {
          case '"': case '\\': case '/': c = e; break;
          case 'b': c = '\b'; break;
          case 'f': c = '\f'; break;
          case 'n': c = '\n'; break;
          case 'r': c = '\r'; break;
          case 't': c = '\t'; break;
          case 'u': c = unicode_escape(); break;
          default: fail("bad escape in string");
        }
      }
      if (!keep) continue;
      if (out.size() >= kMaxStringBytes) fail("string longer than " + std::to_string(kMaxStringBytes) + " bytes");
      out.push_back(static_cast<char>(c));
    }
    return out;
  }

  // Keys of this format are ASCII; keep \u escapes of ASCII, refuse the rest.
  int unicode_escape() {
    char hex[4];
    for (char& h : hex) {
      int c = buffer_.sgetc();
      if (c == kEnd || c == '\n') fail("bad \\u escape");
      h = static_cast<char>(take());
    }
    unsigned code = 0;
    auto [end, err] = std::from_chars(hex, hex + 4, code, 16);
    if (err != std::errc() || end != hex + 4) fail("bad \\u escape");
    if (code >= 0x80) fail("non-ASCII \\u escape is not supported in keys");
    return static_cast<int>(code);
  }
};

// Shortest text that reads back as the same float; JSON has no NaN/inf, so they become null.
inline void append_float(std::string& out, float value) {
  if (value != value || value == std::numeric_limits<float>::infinity() ||
      value == -std::numeric_limits<float>::infinity()) {
    out += "null";
    return;
  }
  char buffer[32];
  auto [end, err] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  if (err != std::errc()) throw std::runtime_error("cannot format a float");
  out.append(buffer, end);
}

}  // namespace tokdrop::json
