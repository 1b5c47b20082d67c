//! CUDA backend (in progress, issue 4): so far the kernel build — `kernels/*.cu` compiled at
//! run time by NVRTC for a real architecture and resource-checked ([`nvrtc`]). Device buffers,
//! launchers and the [`crate::backend::Backend`] implementation come next; until then no
//! command runs on a GPU.

pub mod nvrtc;
