//! The CUDA launch of attention (flash-attention's scheme): written with the kernels.
