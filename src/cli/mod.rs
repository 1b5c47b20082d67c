pub mod search_args;
pub mod tot;
