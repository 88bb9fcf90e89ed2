// How the ops' argument errors print shapes and dtypes: as Python prints them ((3,), (2, 4); float32,
// bfloat16), so a C++ op's message reads like the Python API's. One place for every op's checks.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <sstream>
#include <string>

namespace effops::bindings {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << (s.size() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string dtype_name(c10::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

}  // namespace effops::bindings
