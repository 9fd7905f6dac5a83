//! sft-objecqa
