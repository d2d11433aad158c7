// Host-side device queries shared by the launchers.
#include "common.cuh"

namespace rag_engine {
namespace cuda {

DeviceLimits device_limits() {
  DeviceLimits lim;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return lim;
  cudaDeviceGetAttribute(&lim.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&lim.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&lim.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (lim.sms < 1) lim.sms = 1;
  if (lim.smem_optin < (48 << 10)) lim.smem_optin = 48 << 10;
  if (lim.smem_per_sm < lim.smem_optin) lim.smem_per_sm = lim.smem_optin;
  return lim;
}

cudaError_t allow_smem(const void* kernel, size_t bytes) {
  if (bytes <= (48u << 10)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace cuda
}  // namespace rag_engine
