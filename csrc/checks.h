// Argument checks for the torch launchers (flashinfer/vLLM style): fail with a readable message, never on device.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define DSM_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), "dsm: " #x " must be a CUDA tensor")
#define DSM_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), "dsm: " #x " must have ", (d), " dims, got ", (x).dim())
#define DSM_CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), "dsm: " #x " must be ", (t), ", got ", (x).scalar_type())
#define DSM_CHECK_LAST_CONTIGUOUS(x) TORCH_CHECK((x).stride(-1) == 1, "dsm: " #x " must be contiguous in its last dim")
#define DSM_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), "dsm: " #x " and " #y " must be on the same device")
#define DSM_CUDA_OK(expr)                                                                   \
  do {                                                                                      \
    const cudaError_t dsm_err_ = (expr);                                                    \
    TORCH_CHECK(dsm_err_ == cudaSuccess, "dsm: ", #expr, ": ", cudaGetErrorString(dsm_err_)); \
  } while (0)
