// Argument checks shared by the native operators, worded like formats.tensor.validate_layout so a
// bad tensor gets the same message from Python and C++.
#pragma once

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>
#include <vector>

namespace qlora_kernels {

// The dtype as Python prints it ("torch.float32").
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The shape as a Python tuple ("(3, 4)", "(5,)").
inline std::string py_shape(c10::IntArrayRef shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

// Same wording as formats.tensor.validate_layout: "'name' should be DTYPE SHAPE, got DTYPE SHAPE".
inline void check_field(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                        std::vector<int64_t> shape) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == c10::IntArrayRef(shape), op, ": '", name,
                    "' should be ", py_dtype(dtype), " ", py_shape(shape), ", got ", py_dtype(t.scalar_type()), " ",
                    py_shape(t.sizes()));
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": '", name, "' is on ", t.device(),
                    "; the native kernels run on the CPU: move the weight with qt.to('cpu'), or use "
                    "backend='triton' for CUDA tensors");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": '", name, "' must be contiguous; pass t.contiguous()");
}

}  // namespace qlora_kernels
