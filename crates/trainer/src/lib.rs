//! sft-trainer
