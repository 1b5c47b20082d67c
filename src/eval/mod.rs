//! Evaluation over medical multiple-choice question sets: the datasets, the `direct` baseline
//! and a resumable harness so far (the other baselines and QM-ToT runs come with issue 6).

pub mod baselines;
pub mod datasets;
pub mod distill;
pub mod harness;
