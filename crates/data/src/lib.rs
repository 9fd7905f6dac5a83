//! sft-data
