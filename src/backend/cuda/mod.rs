//! CUDA backend (in progress, issue 4): so far the kernel build — `kernels/*.cu` compiled at
//! run time by NVRTC for a real architecture and resource-checked ([`nvrtc`]), with an
//! on-disk cache of the results ([`kernel_cache`]). Device buffers, launchers and the
//! [`crate::backend::Backend`] implementation come next; until then no command runs on a GPU.

pub mod kernel_cache;
pub mod nvrtc;
