//! sft-classifier: text classifiers on a frozen all-MiniLM-L6-v2 sentence encoder (BERT, mean
//! pooling, L2 normalisation) with small trained heads. Two heads ship with the project: the
//! response-tone classifier of IFS (answer-like 1 / continuation-like 0) and the ObjecQA judge
//! (objective 1 / subjective 0). This crate holds the encoder, the heads and their training, the
//! tone classifier's training-data recipe and the evaluation of labelled JSONL files; it knows
//! nothing of the language model being tuned, nor of how IFS or ObjecQA prompt it.
pub mod classifier;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod features;
pub mod head;
pub mod metrics;
pub mod recipe;
pub mod sources;
pub mod train;

pub use classifier::{Classifier, HeadMeta, Judge, ToneClassifier, View};
pub use encoder::Encoder;
pub use error::{Error, Result};
pub use features::FeatureSet;
pub use head::{Head, HeadKind, HeadTrainConfig};
pub use metrics::Metrics;
pub use recipe::{build_examples, Example, RecipeConfig, Shape};
pub use sources::Pair;
pub use train::{TrainConfig, TrainReport};
