// Portability macros for the header-only math shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GZ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GZ_HOST_DEVICE inline
#endif
