//! CUDA path of cnse-dp: pinned staging, model streaming to the GPU, sampling kernels
