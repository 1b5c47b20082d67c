//! Evaluation over medical multiple-choice question sets: the datasets so far (the harness,
//! baselines and QM-ToT runs come with issue 6).

pub mod datasets;
