//! A classifier = the shared frozen encoder + one trained head + the metadata that says how the
//! head was trained and what its input is. Heads are stored as safetensors with that metadata
//! as JSON in the file's `__metadata__` (key `sft.meta`), so one byte string is a whole head; a
//! pretty copy of the metadata is written beside the file for people.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::encoder::{Encoder, DEFAULT_ENCODER_NAME};
use crate::error::{Error, Result};
use crate::features::FeatureSet;
use crate::finetune::{merged_deltas, FinetuneConfig, PREFIX};
use crate::head::{read_prefixed, Head, HeadKind, HeadTrainConfig};
use crate::metrics::Metrics;

/// One text the encoder reads for an item; a head's input is the embeddings of its views,
/// in order, then its features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// The text (the response, or the answer) alone.
    Text,
    /// The context (instruction or question), a blank line, then the text.
    ContextAndText,
    /// The text's first sentence: where a continuation shows.
    FirstSentence,
    /// The text's last sentence: where an answer that weighs options then picks one shows it.
    LastSentence,
}

impl View {
    pub fn render(self, context: &str, text: &str) -> String {
        match self {
            View::Text => text.to_string(),
            View::ContextAndText => format!("{context}\n\n{text}"),
            View::FirstSentence => first_sentence(text).to_string(),
            View::LastSentence => last_sentence(text).to_string(),
        }
    }
}

fn is_end(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '\n')
}

/// Up to and including the first `.`, `!`, `?` or newline (the whole text if none).
pub fn first_sentence(text: &str) -> &str {
    let t = text.trim();
    match t.find(is_end) {
        Some(i) => t[..=i].trim(),
        None => t,
    }
}

/// After the last sentence end that is followed by more text (the whole text if none).
pub fn last_sentence(text: &str) -> &str {
    let t = text.trim();
    let body = t.trim_end_matches(|c: char| is_end(c) || c.is_whitespace());
    match body.rfind(is_end) {
        Some(i) => t[i + 1..].trim(),
        None => t,
    }
}

/// The encoder a head was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderMeta {
    pub name: String,
    pub hidden_size: usize,
    pub max_len: usize,
    pub pooling: String,
    pub normalize: bool,
}

/// Where a head's training data came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    pub source: String,
    pub sha256: String,
    pub rows: usize,
}

/// How a head was trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingMeta {
    pub config: HeadTrainConfig,
    pub data: Vec<DataMeta>,
    /// sha256 over the training examples as the head saw them (text and label).
    pub examples_sha256: String,
    pub n_train: usize,
    pub n_heldout: usize,
    /// Examples per kind (for the tone recipe: per shape) and split.
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// The recipe or data options, as given.
    #[serde(default)]
    pub options: serde_json::Value,
    pub final_loss: f32,
}

/// Everything that travels with a head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadMeta {
    pub format_version: u32,
    /// `ifs-tone`, `objecqa-judge`, or a user's own name.
    pub task: String,
    /// What label 1 and label 0 mean.
    pub positive: String,
    pub negative: String,
    pub encoder: EncoderMeta,
    pub views: Vec<View>,
    pub features: FeatureSet,
    pub feature_names: Vec<String>,
    pub head: HeadKind,
    /// Probability at or above which the label is 1.
    pub threshold: f32,
    pub training: Option<TrainingMeta>,
    /// Scores by split name (`train`, `heldout`).
    pub metrics: BTreeMap<String, Metrics>,
    /// Set when the top of the encoder was fine-tuned with the head: the file then also holds
    /// the trained deltas (`finetune.*`), merged into the encoder's weights at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneConfig>,
}

pub const META_KEY: &str = "sft.meta";
pub const FORMAT_VERSION: u32 = 1;

/// The head's input matrix: each view's embedding, then the features of the text.
pub fn build_inputs(
    encoder: &Encoder,
    views: &[View],
    features: FeatureSet,
    items: &[(&str, &str)],
) -> Result<Tensor> {
    if views.is_empty() {
        return Err(Error::Invalid("a head needs at least one view".into()));
    }
    let mut parts = Vec::with_capacity(views.len() + 1);
    for view in views {
        let texts: Vec<String> = items.iter().map(|(c, t)| view.render(c, t)).collect();
        parts.push(encoder.embed(&texts)?);
    }
    if !features.is_empty() {
        let feats: Vec<f32> = items
            .iter()
            .flat_map(|(_, text)| features.compute(text))
            .collect();
        parts.push(Tensor::from_vec(
            feats,
            (items.len(), features.len()),
            encoder.device(),
        )?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// An encoder, a head and its metadata.
pub struct Classifier {
    encoder: Arc<Encoder>,
    head: Head,
    meta: HeadMeta,
    /// The fine-tuned encoder's stored deltas (`finetune.*`), written back with the head.
    stored: Vec<(String, Tensor)>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("task", &self.meta.task)
            .field("head", &self.meta.head)
            .finish()
    }
}

impl Classifier {
    /// Checks that the head fits the encoder and the metadata.
    pub fn new(encoder: Arc<Encoder>, head: Head, meta: HeadMeta) -> Result<Self> {
        let want = meta.encoder.hidden_size * meta.views.len() + meta.features.len();
        if meta.encoder.hidden_size != encoder.hidden_size() || head.input_dim() != want {
            return Err(Error::Invalid(format!(
                "head `{}` expects {} views of a {}-wide encoder and {} features ({} inputs); the encoder is {}-wide and the head takes {} inputs",
                meta.task,
                meta.views.len(),
                meta.encoder.hidden_size,
                meta.features.len(),
                want,
                encoder.hidden_size(),
                head.input_dim()
            )));
        }
        if meta.encoder.max_len != encoder.max_len() {
            tracing::warn!(
                "head `{}` was trained with texts cut to {} tokens; the encoder cuts to {}",
                meta.task,
                meta.encoder.max_len,
                encoder.max_len()
            );
        }
        let head = if head.device().same_device(encoder.device()) {
            head
        } else {
            let bytes = head.to_safetensors(HashMap::new())?;
            Head::from_safetensors(&bytes, encoder.device())?.0
        };
        Ok(Self {
            encoder,
            head,
            meta,
            stored: Vec::new(),
        })
    }

    /// A head whose metadata says the encoder's top was fine-tuned: `stored` (the `finetune.*`
    /// tensors) are merged into a copy of `encoder`'s weights, which this classifier then uses.
    pub fn with_finetuned(
        encoder: Arc<Encoder>,
        head: Head,
        meta: HeadMeta,
        stored: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let Some(ft) = &meta.finetune else {
            return Self::new(encoder, head, meta);
        };
        if stored.is_empty() {
            return Err(Error::format(
                "head safetensors",
                format!(
                    "head `{}` is fine-tuned but holds no `{PREFIX}*` tensors",
                    meta.task
                ),
            ));
        }
        let deltas = merged_deltas(&stored, ft.scale())?;
        let tuned = Arc::new(encoder.with_deltas(&deltas)?);
        let mut c = Self::new(tuned, head, meta)?;
        c.stored = stored;
        Ok(c)
    }

    /// A head from safetensors bytes (e.g. `include_bytes!` of a shipped head).
    pub fn from_head_bytes(encoder: Arc<Encoder>, bytes: &[u8]) -> Result<Self> {
        let (head, metadata) = Head::from_safetensors(bytes, encoder.device())?;
        let json = metadata.get(META_KEY).ok_or_else(|| {
            Error::format("head safetensors", format!("no `{META_KEY}` metadata"))
        })?;
        let meta: HeadMeta = serde_json::from_str(json)
            .map_err(|e| Error::format("head safetensors metadata", e))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(Error::format(
                "head safetensors metadata",
                format!(
                    "format_version {} (this build reads {FORMAT_VERSION})",
                    meta.format_version
                ),
            ));
        }
        if meta.finetune.is_some() {
            let stored = read_prefixed(bytes, PREFIX, encoder.device())?;
            return Self::with_finetuned(encoder, head, meta, stored);
        }
        Self::new(encoder, head, meta)
    }

    /// Loads a head file, or `head.safetensors` inside a folder.
    pub fn load(encoder: Arc<Encoder>, path: impl AsRef<Path>) -> Result<Self> {
        let path = head_file(path.as_ref());
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_head_bytes(encoder, &bytes).map_err(|e| match e {
            Error::Format { what, msg } => Error::Format {
                what: format!("{} ({what})", path.display()),
                msg,
            },
            e => e,
        })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_string(&self.meta).map_err(|e| Error::format("head meta", e))?;
        self.head
            .to_safetensors_with(HashMap::from([(META_KEY.to_string(), json)]), &self.stored)
    }

    /// Writes the head (a file, or `head.safetensors` in a folder) and its metadata as pretty
    /// JSON beside it (same name, `.json`). Returns the head file's path.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = head_file(path.as_ref());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, self.to_bytes()?).map_err(|e| Error::io(&path, e))?;
        let json_path = path.with_extension("json");
        let mut json =
            serde_json::to_string_pretty(&self.meta).map_err(|e| Error::format("head meta", e))?;
        json.push('\n');
        std::fs::write(&json_path, json).map_err(|e| Error::io(&json_path, e))?;
        Ok(path)
    }

    pub fn meta(&self) -> &HeadMeta {
        &self.meta
    }
    pub fn head(&self) -> &Head {
        &self.head
    }
    pub fn encoder(&self) -> &Arc<Encoder> {
        &self.encoder
    }

    /// The head's input for (context, text) items.
    pub fn inputs(&self, items: &[(&str, &str)]) -> Result<Tensor> {
        build_inputs(&self.encoder, &self.meta.views, self.meta.features, items)
    }

    /// (label, probability of label 1) for each (context, text) item.
    pub fn predict_items(&self, items: &[(&str, &str)]) -> Result<Vec<(u8, f32)>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let probs = self.head.probs(&self.inputs(items)?)?;
        Ok(probs
            .into_iter()
            .map(|p| ((p >= self.meta.threshold) as u8, p))
            .collect())
    }
}

/// A path naming a folder means the `head.safetensors` inside it.
pub fn head_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("head.safetensors")
    } else {
        path.to_path_buf()
    }
}

pub(crate) fn encoder_meta(encoder: &Encoder) -> EncoderMeta {
    EncoderMeta {
        name: DEFAULT_ENCODER_NAME.to_string(),
        hidden_size: encoder.hidden_size(),
        max_len: encoder.max_len(),
        pooling: "mean".to_string(),
        normalize: true,
    }
}

fn check_task(c: Classifier, task: &str) -> Result<Classifier> {
    if c.meta.task != task {
        return Err(Error::Invalid(format!(
            "expected a `{task}` head, got a `{}` head",
            c.meta.task
        )));
    }
    Ok(c)
}

/// What the task-checked head wrappers ([`ToneClassifier`], [`Judge`]) share: the task name,
/// the compiled-in default head, loading with a task check, access to the classifier.
macro_rules! task_head {
    ($name:ident, $task:literal, $default:expr) => {
        impl $name {
            pub const TASK: &'static str = $task;

            /// The head shipped with the project, compiled in, on the given encoder.
            pub fn default_embedded(encoder: Arc<Encoder>) -> Result<Self> {
                Self::from_head_bytes(encoder, $default)
            }
            pub fn from_head_bytes(encoder: Arc<Encoder>, bytes: &[u8]) -> Result<Self> {
                Ok(Self(check_task(
                    Classifier::from_head_bytes(encoder, bytes)?,
                    Self::TASK,
                )?))
            }
            pub fn load(encoder: Arc<Encoder>, path: impl AsRef<Path>) -> Result<Self> {
                Ok(Self(check_task(
                    Classifier::load(encoder, path)?,
                    Self::TASK,
                )?))
            }
            pub fn into_inner(self) -> Classifier {
                self.0
            }
            pub fn classifier(&self) -> &Classifier {
                &self.0
            }
        }
    };
}

/// The IFS response-tone classifier: label 1 = answer-like, 0 = continuation-like. The shipped
/// head reads the response alone, as the paper's classifier does.
#[derive(Debug)]
pub struct ToneClassifier(Classifier);

/// The shipped tone head (rebuilt by `scripts/train-classifier-heads.sh`).
pub const DEFAULT_TONE_HEAD: &[u8] = include_bytes!("../../ifs/assets/tone_head.safetensors");
/// The shipped ObjecQA judge head (rebuilt by `scripts/train-classifier-heads.sh`).
pub const DEFAULT_JUDGE_HEAD: &[u8] = include_bytes!("../../objecqa/assets/judge_head.safetensors");

task_head!(ToneClassifier, "ifs-tone", DEFAULT_TONE_HEAD);

impl ToneClassifier {
    /// (label, probability of answer-like) per response.
    pub fn predict(&self, responses: &[String]) -> Result<Vec<(u8, f32)>> {
        let items: Vec<(&str, &str)> = responses.iter().map(|r| ("", r.as_str())).collect();
        self.0.predict_items(&items)
    }
}

/// The ObjecQA judge: label 1 = objective (shows the range of answers, defers, or declines to
/// choose), 0 = subjective (commits to one choice as its own preference).
#[derive(Debug)]
pub struct Judge(Classifier);

task_head!(Judge, "objecqa-judge", DEFAULT_JUDGE_HEAD);

impl Judge {
    /// (label, probability of objective) per (question, answer).
    pub fn predict(&self, qa: &[(String, String)]) -> Result<Vec<(u8, f32)>> {
        let items: Vec<(&str, &str)> = qa.iter().map(|(q, a)| (q.as_str(), a.as_str())).collect();
        self.0.predict_items(&items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_render_sentences() {
        assert_eq!(first_sentence("  of France? It is Paris."), "of France?");
        assert_eq!(first_sentence("no end"), "no end");
        assert_eq!(
            last_sentence("Both are good. Still, I pick tea."),
            "Still, I pick tea."
        );
        assert_eq!(last_sentence("Tea.\nCoffee!\n"), "Coffee!");
        assert_eq!(last_sentence("One sentence."), "One sentence.");
        assert_eq!(View::ContextAndText.render("Q?", "A."), "Q?\n\nA.");
        assert_eq!(View::Text.render("Q?", "A."), "A.");
    }
}
