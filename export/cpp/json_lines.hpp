// A small JSON reader for the narrow input format of tokdrop-serve (one JSON object per line,
// holding arrays of arrays of integers), and a writer for float arrays.
//
// It parses the whole JSON grammar except that numbers must be integers in the int64 range
// (token ids, masks and type ids), nesting is limited (no stack exhaustion on hostile input), and
// every error is a JsonError with the byte column where it happened. Not a general-purpose library.
#pragma once

#include <charconv>
#include <limits>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace tokdrop::json {

class JsonError : public std::runtime_error {
 public:
  JsonError(const std::string& what, size_t column)
      : std::runtime_error(what + " (at column " + std::to_string(column + 1) + ")") {}
};

struct Value {
  enum class Kind { Null, Bool, Integer, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  static const char* kind_name(Kind kind) {
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
};

class Parser {
 public:
  static constexpr int kMaxDepth = 8;

  explicit Parser(std::string_view text) : text_(text) {}

  Value parse_document() {
    Value value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the JSON value");
    return value;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const { throw JsonError(what, pos_); }

  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\r' || text_[pos_] == '\n'))
      ++pos_;
  }

  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end of line");
    return text_[pos_];
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  void literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal");
    pos_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("JSON nested too deeply");
    char c = peek();
    Value value;
    if (c == '{') {
      value.kind = Value::Kind::Object;
      ++pos_;
      if (peek() == '}') {
        ++pos_;
        return value;
      }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = parse_string();
        expect(':');
        if (value.object.count(key)) fail("duplicate key \"" + key + "\"");
        value.object.emplace(std::move(key), parse_value(depth + 1));
        char next = peek();
        ++pos_;
        if (next == '}') break;
        if (next != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      value.kind = Value::Kind::Array;
      ++pos_;
      if (peek() == ']') {
        ++pos_;
        return value;
      }
      while (true) {
        value.array.push_back(parse_value(depth + 1));
        char next = peek();
        ++pos_;
        if (next == ']') break;
        if (next != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      value.kind = Value::Kind::String;
      value.string = parse_string();
    } else if (c == 't') {
      literal("true");
      value.kind = Value::Kind::Bool;
      value.boolean = true;
    } else if (c == 'f') {
      literal("false");
      value.kind = Value::Kind::Bool;
    } else if (c == 'n') {
      literal("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      value.kind = Value::Kind::Integer;
      value.integer = parse_integer();
    } else {
      fail(std::string("unexpected character '") + c + "'");
    }
    return value;
  }

  int64_t parse_integer() {
    size_t start = pos_;
    if (text_[pos_] == '-') ++pos_;
    size_t digits = pos_;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    if (pos_ == digits) fail("invalid number");
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E'))
      fail("numbers must be integers (token ids, mask and type values)");
    if (text_[digits] == '0' && pos_ - digits > 1) fail("invalid number (leading zero)");
    int64_t out = 0;
    auto [end, err] = std::from_chars(text_.data() + start, text_.data() + pos_, out);
    if (err != std::errc() || end != text_.data() + pos_) {
      pos_ = start;
      fail("integer out of the int64 range");
    }
    return out;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated string");
      char e = text_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          // Keys of this format are ASCII; keep \u escapes of ASCII, refuse the rest.
          if (pos_ + 4 > text_.size()) fail("bad \\u escape");
          unsigned code = 0;
          auto [end, err] = std::from_chars(text_.data() + pos_, text_.data() + pos_ + 4, code, 16);
          if (err != std::errc() || end != text_.data() + pos_ + 4) fail("bad \\u escape");
          if (code >= 0x80) fail("non-ASCII \\u escape is not supported in keys");
          out.push_back(static_cast<char>(code));
          pos_ += 4;
          break;
        }
        default: fail("bad escape in string");
      }
    }
    return out;
  }
};

inline Value parse(std::string_view line) { return Parser(line).parse_document(); }

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
