//! `sft`: the command-line front end of the workspace. One subcommand per job; each lives in
//! `cmd/<name>.rs` with its own clap `Args` and a `run` function. The binary `sft-train` is
//! `sft train`.
use clap::{Parser, Subcommand};
use sft_cli::cmd;

#[derive(Parser)]
#[command(
    name = "sft",
    version,
    about = "LLaMA supervised fine-tuning with IFS early stopping"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a YAML config (the same as `sft-train`).
    Train(cmd::train::TrainArgs),
    /// Convert a GGUF checkpoint into a Hugging Face folder (config, safetensors, tokenizer).
    ImportGguf(cmd::import_gguf::ImportGgufArgs),
    /// Score prompts: input ids, mean next-token loss, top-10 last logits (one JSON line each).
    Score(cmd::score::ScoreArgs),
    /// Generate continuations for prompts in batches (one JSON line each).
    Generate(cmd::generate::GenerateArgs),
    /// Fold a LoRA adapter into the base weights and write a Hugging Face folder.
    MergeLora(cmd::merge_lora::MergeLoraArgs),
    /// Inspect the instruction data a config produces.
    Data(cmd::data::DataArgs),
    /// Train or evaluate the response-tone classifier.
    Classifier(cmd::classifier::ClassifierArgs),
    /// Instruction Following Score of a model.
    Ifs(cmd::ifs::IfsArgs),
    /// ObjecQA score of a model, and its judge.
    Objecqa(cmd::objecqa::ObjecqaArgs),
    /// List and show training runs in a checkpoints folder.
    Runs(cmd::runs::RunsArgs),
    /// Write a Hugging Face folder with random weights for a config.json.
    InitRandom(cmd::init_random::InitRandomArgs),
}

fn main() {
    cmd::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cmd::train::run(a),
        Command::ImportGguf(a) => cmd::import_gguf::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::MergeLora(a) => cmd::merge_lora::run(a),
        Command::Data(a) => cmd::data::run(a),
        Command::Classifier(a) => cmd::classifier::run(a),
        Command::Ifs(a) => cmd::ifs::run(a),
        Command::Objecqa(a) => cmd::objecqa::run(a),
        Command::Runs(a) => cmd::runs::run(a),
        Command::InitRandom(a) => cmd::init_random::run(a),
    };
    sft_cli::cmd::output::finish(result);
}
