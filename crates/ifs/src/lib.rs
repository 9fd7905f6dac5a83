//! sft-ifs: the Instruction Following Score of arXiv 2307.03692 and the early-stopping rule at
//! its plateau.
//!
//! The bundled instruction set and its fragments ([`instructions`]), the evaluator that
//! answers them through an [`sft_eval::Answer`] and labels each response with the tone
//! classifier ([`evaluator`]), and the plateau rule ([`plateau`]). It never sees the trainer.
pub mod evaluator;
pub mod instructions;
pub mod plateau;
pub mod tone;
