//! sft-classifier
