// recurrent_cuda.cu compiled as C++ on the CPU (cuda_emulation.h); see tests/run_cuda_emulation.py.
#define BNLSTM_CUDA_EMULATION 1
#include "../recurrent_cuda.cu"
