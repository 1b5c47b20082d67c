//! Evaluation over medical multiple-choice question sets: the datasets and the `direct`
//! baseline so far (the harness, the other baselines and QM-ToT runs come with issue 6).

pub mod baselines;
pub mod datasets;
