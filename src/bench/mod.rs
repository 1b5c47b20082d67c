//! `qmtot bench …`: throughput measurements that print what they saw. GPU kernel and tree
//! benchmarks join these with the CUDA backend.

pub mod attention;
pub mod decode;
pub mod kernels;
pub mod random_model;
pub mod tot;
pub mod tree;
