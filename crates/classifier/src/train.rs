//! Training a head from a YAML config (`sft classifier train --config FILE.yaml`): the tone
//! classifier from instruction/response pairs through the recipe, or the judge from a labelled
//! file with train/test splits. Deterministic: the same config and data give the same head.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::classifier::{
    build_inputs, encoder_meta, Classifier, DataMeta, HeadMeta, Judge, ToneClassifier,
    TrainingMeta, View, FORMAT_VERSION,
};
use crate::encoder::{default_encoder_dir, Encoder};
use crate::error::{Error, Result};
use crate::eval::{read_labelled, select_split, Labelled, JUDGE_KEYS, TONE_KEYS};
use crate::features::FeatureSet;
use crate::finetune::{self, BertWeights, FinetuneConfig, Split};
use crate::head::{Head, HeadKind, HeadTrainConfig};
use crate::metrics::{Metrics, THRESHOLD_SWEEP};
use crate::recipe::{build_examples, split_pairs, Example, RecipeConfig};
use crate::sources::{oasst1_pairs_from_hub, read_pairs_jsonl_split, Pair};

/// Which classifier a config trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// The IFS response-tone classifier, from pairs through the recipe.
    IfsTone,
    /// The ObjecQA judge, from a labelled file.
    ObjecqaJudge,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::IfsTone => ToneClassifier::TASK,
            Task::ObjecqaJudge => Judge::TASK,
        }
    }
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Task::IfsTone => ("answer-like", "continuation-like"),
            Task::ObjecqaJudge => ("objective", "subjective"),
        }
    }
}

/// Where pairs come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum PairSource {
    /// A JSONL file of instruction/response pairs (see [`crate::sources::read_pairs_jsonl`]), optionally only
    /// the lines of one `"split"`.
    Path {
        path: PathBuf,
        #[serde(default)]
        split: Option<String>,
    },
    /// `OpenAssistant/oasst1` through hf-hub (needs the hub): first prompts and best replies.
    Hub {
        hub: String,
        #[serde(default)]
        revision: Option<String>,
        #[serde(default)]
        lang: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToneData {
    pub sources: Vec<PairSource>,
    #[serde(default = "default_heldout")]
    pub heldout_fraction: f64,
    #[serde(default)]
    pub recipe: RecipeConfig,
    /// Also write the held-out examples here as `{"instruction","response","label","shape"}`.
    #[serde(default)]
    pub heldout_out: Option<PathBuf>,
    /// Hand-labelled responses (`{"instruction","response","label"}` lines, as
    /// `crates/classifier/data/real_outputs/`) added to the training examples as they are.
    #[serde(default)]
    pub labelled: Vec<LabelledSource>,
    /// Hand-labelled responses scored after training (metrics key `validation`): the data
    /// for choosing steps, weights and threshold, never the test split.
    #[serde(default)]
    pub validation: Vec<LabelledSource>,
}

/// A labelled JSONL file, optionally only the lines of one `"split"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledSource {
    pub path: PathBuf,
    #[serde(default)]
    pub split: Option<String>,
    /// How many times each line is added (a weight against the recipe's many examples);
    /// validation sources take 1.
    #[serde(default = "default_repeat")]
    pub repeat: usize,
}

fn default_repeat() -> usize {
    1
}

impl LabelledSource {
    fn read(&self) -> Result<(Vec<Labelled>, DataMeta)> {
        let bytes = std::fs::read(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let items = select_split(read_labelled(&self.path, TONE_KEYS)?, self.split.as_deref());
        if items.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no labelled lines{}",
                self.path.display(),
                match &self.split {
                    Some(s) => format!(" with split `{s}`"),
                    None => String::new(),
                }
            )));
        }
        let meta = DataMeta {
            source: match &self.split {
                Some(s) => format!("{} (split {s})", self.path.display()),
                None => self.path.display().to_string(),
            },
            sha256: sha256_hex(&bytes),
            rows: items.len(),
        };
        Ok((items, meta))
    }
}

fn default_heldout() -> f64 {
    0.2
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeData {
    /// `{"question","answer","label","split"}` lines.
    pub path: PathBuf,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    #[serde(default = "default_test_split")]
    pub test_split: String,
}

fn default_train_split() -> String {
    "train".into()
}
fn default_test_split() -> String {
    "test".into()
}

/// Optimiser settings of the head (see [`HeadTrainConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub balance_classes: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        let d = HeadTrainConfig::default();
        Self {
            steps: d.steps,
            lr: d.lr,
            weight_decay: d.weight_decay,
            seed: d.seed,
            balance_classes: d.balance_classes,
        }
    }
}

/// A training config. Relative paths are relative to the working directory (the repository
/// root for the shipped configs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub task: Task,
    /// The head file to write (its metadata goes beside it as `.json`).
    pub output: PathBuf,
    /// Encoder folder; default `$SFT_CACHE/models/all-minilm-l6-v2`.
    #[serde(default)]
    pub encoder: Option<PathBuf>,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// The texts the encoder reads per item (default: the text alone).
    #[serde(default = "default_views")]
    pub views: Vec<View>,
    #[serde(default)]
    pub features: FeatureSet,
    #[serde(default = "default_head")]
    pub head: HeadKind,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    #[serde(default)]
    pub tone: Option<ToneData>,
    #[serde(default)]
    pub judge: Option<JudgeData>,
    /// Fine-tune the encoder's top layers with the head (LoRA; see [`crate::finetune`]) instead
    /// of training the head on the frozen encoder. Needs `views: [text]`.
    #[serde(default)]
    pub finetune: Option<FinetuneConfig>,
}

fn default_views() -> Vec<View> {
    vec![View::Text]
}
fn default_max_len() -> usize {
    Encoder::DEFAULT_MAX_LEN
}
fn default_head() -> HeadKind {
    HeadTrainConfig::default().head
}
fn default_threshold() -> f32 {
    0.5
}

impl TrainConfig {
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: TrainConfig = serde_yaml::from_str(&text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            Error::Line {
                path: path.to_path_buf(),
                line,
                msg: e.to_string(),
            }
        })?;
        cfg.validate()
            .map_err(|e| Error::format(path.display().to_string(), e))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        match (self.task, &self.tone, &self.judge) {
            (Task::IfsTone, Some(t), _) => {
                if t.sources.is_empty() {
                    return Err(Error::Invalid(
                        "tone.sources: give at least one source".into(),
                    ));
                }
                if let Some(l) = t.labelled.iter().find(|l| l.repeat == 0) {
                    return Err(Error::Invalid(format!(
                        "tone.labelled: `{}` has repeat 0 (give 1 or more, or leave it out)",
                        l.path.display()
                    )));
                }
                if let Some(v) = t.validation.iter().find(|v| v.repeat != 1) {
                    return Err(Error::Invalid(format!(
                        "tone.validation: `{}` has repeat {} (validation lines count once)",
                        v.path.display(),
                        v.repeat
                    )));
                }
                if !(0.0..1.0).contains(&t.heldout_fraction) {
                    return Err(Error::Invalid(format!(
                        "tone.heldout_fraction must be in [0, 1), got {}",
                        t.heldout_fraction
                    )));
                }
            }
            (Task::IfsTone, None, _) => {
                return Err(Error::Invalid(
                    "task ifs-tone needs a `tone:` section".into(),
                ))
            }
            (Task::ObjecqaJudge, _, None) => {
                return Err(Error::Invalid(
                    "task objecqa-judge needs a `judge:` section".into(),
                ))
            }
            _ => {}
        }
        if self.views.is_empty() {
            return Err(Error::Invalid("views: give at least one view".into()));
        }
        if let Some(ft) = &self.finetune {
            if self.views != [View::Text] {
                return Err(Error::Invalid(format!(
                    "finetune: needs `views: [text]`, got {:?}",
                    self.views
                )));
            }
            ft.validate(None)?;
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Invalid(format!(
                "threshold must be in [0, 1], got {}",
                self.threshold
            )));
        }
        Ok(())
    }

    pub fn head_config(&self) -> HeadTrainConfig {
        HeadTrainConfig {
            head: self.head,
            steps: self.optimizer.steps,
            lr: self.optimizer.lr,
            weight_decay: self.optimizer.weight_decay,
            seed: self.optimizer.seed,
            balance_classes: self.optimizer.balance_classes,
        }
    }
}

/// What a training run produced.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub output: PathBuf,
    pub task: String,
    pub n_train: usize,
    pub n_heldout: usize,
    pub train: Metrics,
    pub heldout: Option<Metrics>,
    pub validation: Option<Metrics>,
    pub seconds_embedding: f64,
    pub seconds_training: f64,
}

/// Labelled items ready for a head: train, held-out and validation, plus provenance.
pub struct Dataset {
    pub train: Vec<Labelled>,
    pub heldout: Vec<Labelled>,
    /// Scored after training under the metrics key `validation` (empty: none).
    pub validation: Vec<Labelled>,
    pub data: Vec<DataMeta>,
    pub counts: BTreeMap<String, usize>,
    pub heldout_examples: Vec<Example>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn to_labelled(examples: &[Example]) -> Vec<Labelled> {
    examples
        .iter()
        .map(|e| Labelled {
            context: e.instruction.clone(),
            text: e.text.clone(),
            label: e.label,
            split: None,
            id: None,
            template: None,
            kind: None,
        })
        .collect()
}

/// Reads every source's pairs, recording each file's hash.
pub fn load_pairs(sources: &[PairSource]) -> Result<(Vec<Pair>, Vec<DataMeta>)> {
    let mut pairs = Vec::new();
    let mut meta = Vec::new();
    for s in sources {
        let (ps, m) = match s {
            PairSource::Path { path, split } => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                let ps = read_pairs_jsonl_split(path, split.as_deref())?;
                let m = DataMeta {
                    source: match split {
                        Some(s) => format!("{} (split {s})", path.display()),
                        None => path.display().to_string(),
                    },
                    sha256: sha256_hex(&bytes),
                    rows: ps.len(),
                };
                (ps, m)
            }
            PairSource::Hub {
                hub,
                revision,
                lang,
            } => {
                if hub != crate::sources::OASST1 {
                    return Err(Error::Invalid(format!(
                        "tone.sources: hub `{hub}` is not supported (only {})",
                        crate::sources::OASST1
                    )));
                }
                let ps = oasst1_pairs_from_hub(revision.as_deref(), lang.as_deref())?;
                let mut h = Sha256::new();
                for p in &ps {
                    h.update(p.instruction.as_bytes());
                    h.update([0]);
                    h.update(p.response.as_bytes());
                    h.update([0]);
                }
                let m = DataMeta {
                    source: format!("hub:{hub}@{}", revision.as_deref().unwrap_or("main")),
                    sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
                    rows: ps.len(),
                };
                (ps, m)
            }
        };
        tracing::info!("{}: {} pairs", m.source, m.rows);
        pairs.extend(ps);
        meta.push(m);
    }
    Ok((pairs, meta))
}

/// The tone classifier's data: pairs → split → recipe (train and held-out), then the
/// hand-labelled lines (each `repeat` times) after the recipe's training examples, and the
/// validation lines.
pub fn tone_dataset(tone: &ToneData) -> Result<Dataset> {
    let (pairs, mut data) = load_pairs(&tone.sources)?;
    let (train_pairs, heldout_pairs) = split_pairs(&pairs, tone.recipe.seed, tone.heldout_fraction);
    let train = build_examples(&train_pairs, &tone.recipe);
    let heldout = build_examples(&heldout_pairs, &tone.recipe);
    let mut counts = BTreeMap::new();
    for (split, ex) in [("train", &train), ("heldout", &heldout)] {
        for e in ex.iter() {
            *counts
                .entry(format!("{split}/{}", e.shape.name()))
                .or_insert(0) += 1;
        }
    }
    let mut train_items = to_labelled(&train);
    for src in &tone.labelled {
        let (items, meta) = src.read()?;
        for l in &items {
            *counts
                .entry(format!("train/labelled_{}", l.label))
                .or_insert(0) += src.repeat;
        }
        for _ in 0..src.repeat {
            train_items.extend(items.iter().cloned());
        }
        data.push(meta);
    }
    let mut validation = Vec::new();
    for src in &tone.validation {
        let (items, meta) = src.read()?;
        for l in &items {
            *counts
                .entry(format!("validation/labelled_{}", l.label))
                .or_insert(0) += 1;
        }
        validation.extend(items);
        data.push(DataMeta {
            source: format!("validation: {}", meta.source),
            ..meta
        });
    }
    Ok(Dataset {
        train: train_items,
        heldout: to_labelled(&heldout),
        validation,
        data,
        counts,
        heldout_examples: heldout,
    })
}

/// The judge's data: a labelled file's train and test splits.
pub fn judge_dataset(judge: &JudgeData) -> Result<Dataset> {
    let bytes = std::fs::read(&judge.path).map_err(|e| Error::io(&judge.path, e))?;
    let all = read_labelled(&judge.path, JUDGE_KEYS)?;
    let rows = all.len();
    let train = select_split(all.clone(), Some(&judge.train_split));
    let heldout = select_split(all, Some(&judge.test_split));
    if train.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no lines with split `{}`",
            judge.path.display(),
            judge.train_split
        )));
    }
    let mut counts = BTreeMap::new();
    for (split, items) in [("train", &train), ("heldout", &heldout)] {
        for l in items.iter() {
            *counts
                .entry(format!("{split}/label_{}", l.label))
                .or_insert(0) += 1;
        }
    }
    Ok(Dataset {
        train,
        heldout,
        validation: Vec::new(),
        data: vec![DataMeta {
            source: judge.path.display().to_string(),
            sha256: sha256_hex(&bytes),
            rows,
        }],
        counts,
        heldout_examples: Vec::new(),
    })
}

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

fn examples_hash(items: &[Labelled]) -> String {
    let mut h = Sha256::new();
    for l in items {
        h.update([l.label]);
        h.update(l.context.as_bytes());
        h.update([0]);
        h.update(l.text.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads the config's encoder (its folder, or the cache's) with its `max_len`.
pub fn load_encoder(cfg: &TrainConfig, device: &Device) -> Result<Encoder> {
    let dir = cfg.encoder.clone().unwrap_or_else(default_encoder_dir);
    let mut enc = if cfg.encoder.is_some() {
        Encoder::load(&dir, device)?
    } else {
        Encoder::load_default(device)?
    };
    enc.set_max_len(cfg.max_len)?;
    Ok(enc)
}

/// Trains a head on a prepared dataset and returns the classifier (not yet saved).
pub fn train_on(
    cfg: &TrainConfig,
    encoder: Arc<Encoder>,
    ds: &Dataset,
) -> Result<(Classifier, TrainReport)> {
    let refs = |items: &[Labelled]| -> Vec<(String, String)> {
        items
            .iter()
            .map(|l| (l.context.clone(), l.text.clone()))
            .collect()
    };
    let (tr, ho, va) = (refs(&ds.train), refs(&ds.heldout), refs(&ds.validation));
    let y_train: Vec<u8> = ds.train.iter().map(|l| l.label).collect();
    let y_heldout: Vec<u8> = ds.heldout.iter().map(|l| l.label).collect();
    let y_validation: Vec<u8> = ds.validation.iter().map(|l| l.label).collect();
    let head_cfg = cfg.head_config();
    let t0 = std::time::Instant::now();
    // (head, fine-tuned tensors, losses, probabilities of train / held-out / validation,
    // validation metrics per epoch, seconds embedding)
    let (head, stored, losses, probs, by_epoch, seconds_embedding) = match &cfg.finetune {
        None => {
            let x_train = build_inputs(&encoder, &cfg.views, cfg.features, &as_refs(&tr))?;
            let x_heldout = build_inputs(&encoder, &cfg.views, cfg.features, &as_refs(&ho))?;
            let x_validation = build_inputs(&encoder, &cfg.views, cfg.features, &as_refs(&va))?;
            let seconds_embedding = t0.elapsed().as_secs_f64();
            tracing::info!(
                "embedded {} + {} texts in {seconds_embedding:.1}s",
                tr.len(),
                ho.len()
            );
            let (head, losses) = Head::train(&x_train, &y_train, &head_cfg)?;
            let probs = [
                head.probs(&x_train)?,
                head.probs(&x_heldout)?,
                head.probs(&x_validation)?,
            ];
            (
                head,
                Vec::new(),
                losses,
                probs,
                Vec::new(),
                seconds_embedding,
            )
        }
        Some(ft) => {
            let weights = BertWeights::load(encoder.dir(), encoder.device())?;
            fn split<'a>(encoder: &Encoder, items: &'a [Labelled], y: &[u8]) -> Result<Split<'a>> {
                let texts: Vec<String> = items.iter().map(|l| l.text.clone()).collect();
                Ok(Split {
                    ids: encoder.token_ids(&texts)?,
                    texts: items.iter().map(|l| l.text.as_str()).collect(),
                    labels: y.to_vec(),
                })
            }
            let t = finetune::train(
                &weights,
                ft,
                cfg.head,
                cfg.features,
                cfg.threshold,
                &split(&encoder, &ds.train, &y_train)?,
                &split(&encoder, &ds.heldout, &y_heldout)?,
                &split(&encoder, &ds.validation, &y_validation)?,
            )?;
            let probs = [t.train_probs, t.heldout_probs, t.validation_probs];
            (
                t.head,
                t.stored,
                t.losses,
                probs,
                t.validation_by_epoch,
                0.0,
            )
        }
    };
    let seconds_training = t0.elapsed().as_secs_f64() - seconds_embedding;
    let score = |p: &[f32], y: &[u8]| Metrics::at_threshold(p, y, cfg.threshold);
    // Where else the threshold could sit: the figures a choice of threshold needs, from the
    // same probabilities (the training path's, which a grid over cached embeddings only
    // approximates).
    for t in THRESHOLD_SWEEP {
        let parts: Vec<String> = [
            ("held-out", &probs[1], &y_heldout),
            ("validation", &probs[2], &y_validation),
        ]
        .into_iter()
        .filter(|(_, _, y)| !y.is_empty())
        .map(|(name, p, y)| {
            let m = Metrics::at_threshold(p, y, t);
            format!("{name} {}/{} ({:.4})", m.tp + m.tn, m.n, m.accuracy)
        })
        .collect();
        if !parts.is_empty() {
            tracing::info!("threshold {t:.1}: {}", parts.join(", "));
        }
    }
    let train_m = score(&probs[0], &y_train);
    let heldout_m = (!y_heldout.is_empty()).then(|| score(&probs[1], &y_heldout));
    let validation_m = (!y_validation.is_empty()).then(|| score(&probs[2], &y_validation));
    let mut metrics = BTreeMap::from([("train".to_string(), train_m)]);
    if let Some(m) = heldout_m {
        metrics.insert("heldout".to_string(), m);
    }
    if let Some(m) = validation_m {
        metrics.insert("validation".to_string(), m);
    }
    for (e, m) in by_epoch.into_iter().enumerate() {
        metrics.insert(format!("validation_epoch_{}", e + 1), m);
    }
    let (positive, negative) = cfg.task.labels();
    let options = match cfg.task {
        Task::IfsTone => serde_json::to_value(&cfg.tone),
        Task::ObjecqaJudge => serde_json::to_value(&cfg.judge),
    }
    .unwrap_or_default();
    let meta = HeadMeta {
        format_version: FORMAT_VERSION,
        task: cfg.task.name().to_string(),
        positive: positive.to_string(),
        negative: negative.to_string(),
        encoder: encoder_meta(&encoder),
        views: cfg.views.clone(),
        features: cfg.features,
        feature_names: cfg.features.names().iter().map(|s| s.to_string()).collect(),
        head: cfg.head,
        threshold: cfg.threshold,
        training: Some(TrainingMeta {
            config: head_cfg,
            data: ds.data.clone(),
            examples_sha256: examples_hash(&ds.train),
            n_train: ds.train.len(),
            n_heldout: ds.heldout.len(),
            counts: ds.counts.clone(),
            options,
            final_loss: losses.last().copied().unwrap_or(f32::NAN),
        }),
        metrics,
        finetune: cfg.finetune.clone(),
    };
    let report = TrainReport {
        output: cfg.output.clone(),
        task: cfg.task.name().to_string(),
        n_train: ds.train.len(),
        n_heldout: ds.heldout.len(),
        train: train_m,
        heldout: heldout_m,
        validation: validation_m,
        seconds_embedding,
        seconds_training,
    };
    Ok((
        Classifier::with_finetuned(encoder, head, meta, stored)?,
        report,
    ))
}

/// The whole job: data, encoder, head, metrics, files.
pub fn run(cfg: &TrainConfig, device: &Device) -> Result<TrainReport> {
    cfg.validate()?;
    let ds = match cfg.task {
        Task::IfsTone => tone_dataset(
            cfg.tone
                .as_ref()
                .ok_or_else(|| Error::Invalid("task ifs-tone needs a `tone:` section".into()))?,
        )?,
        Task::ObjecqaJudge => judge_dataset(cfg.judge.as_ref().ok_or_else(|| {
            Error::Invalid("task objecqa-judge needs a `judge:` section".into())
        })?)?,
    };
    tracing::info!(
        "{}: {} training and {} held-out examples",
        cfg.task.name(),
        ds.train.len(),
        ds.heldout.len()
    );
    let encoder = Arc::new(load_encoder(cfg, device)?);
    let (classifier, mut report) = train_on(cfg, encoder, &ds)?;
    report.output = classifier.save(&cfg.output)?;
    if let Some(path) = cfg.tone.as_ref().and_then(|t| t.heldout_out.as_ref()) {
        write_examples(path, &ds.heldout_examples)?;
    }
    Ok(report)
}

/// Writes examples as `{"instruction","response","label","shape"}` lines.
pub fn write_examples(path: &Path, examples: &[Example]) -> Result<()> {
    let mut out = String::new();
    for e in examples {
        let line = serde_json::to_string(e).map_err(|err| Error::format("example", err))?;
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_config_and_names_bad_fields() {
        let (_dir, p) = crate::testing::temp_file(
            "c.yaml",
            "task: ifs-tone\noutput: out/h.safetensors\nfeatures: tone\nhead: {kind: logistic}\noptimizer: {steps: 10}\ntone:\n  sources:\n    - path: a.jsonl\n    - hub: OpenAssistant/oasst1\n      lang: en\n",
        );
        let c = TrainConfig::from_yaml_file(&p).unwrap();
        assert_eq!(c.head, HeadKind::Logistic);
        assert_eq!(c.optimizer.steps, 10);
        assert_eq!(c.optimizer.lr, HeadTrainConfig::default().lr);
        let t = c.tone.unwrap();
        assert_eq!(t.heldout_fraction, 0.2);
        assert!(matches!(&t.sources[1], PairSource::Hub { lang: Some(l), .. } if l == "en"));

        std::fs::write(
            &p,
            "task: ifs-tone\noutput: x\ntone:\n  sources: []\n  bogus: 1\n",
        )
        .unwrap();
        let e = TrainConfig::from_yaml_file(&p).unwrap_err().to_string();
        assert!(e.contains("c.yaml") && e.contains("bogus"), "{e}");
        for (bad, field) in [
            ("labelled: [{path: r.jsonl, repeat: 0}]", "repeat 0"),
            ("validation: [{path: r.jsonl, repeat: 3}]", "repeat 3"),
            ("labelled: [{path: r.jsonl, weight: 2}]", "weight"),
        ] {
            std::fs::write(
                &p,
                format!(
                    "task: ifs-tone\noutput: x\ntone:\n  sources: [{{path: a.jsonl}}]\n  {bad}\n"
                ),
            )
            .unwrap();
            let e = TrainConfig::from_yaml_file(&p).unwrap_err().to_string();
            assert!(e.contains("c.yaml") && e.contains(field), "{e}");
        }
        std::fs::write(&p, "task: objecqa-judge\noutput: x\n").unwrap();
        let e = TrainConfig::from_yaml_file(&p).unwrap_err().to_string();
        assert!(e.contains("judge"), "{e}");
    }
}
