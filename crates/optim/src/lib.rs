//! sft-optim
