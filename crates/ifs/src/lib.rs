//! sft-ifs
