//! What a training step holds in memory, estimated from the model's shape: the weights, the
//! trainable tensors with their gradients and optimizer state, and the activations the graph
//! keeps for the backward. `sft-train --dry-run` prints it; `examples/gpu_train` prints it
//! beside the CUDA allocator's measured peak.
//!
//! Activations, per layer and token, are the tensors the graph of this crate's ops keeps (each
//! op keeps its inputs): the layer input, the two norms' outputs, q, k and v before and after
//! the rotary embedding, the attention output, o_proj's and down_proj's outputs, the residual
//! sum, and the MLP's gate, up and SwiGLU outputs. Attention keeps no (t x t) scores (its
//! backward recomputes them) and LoRA keeps no dropout mask (redrawn from its key). With
//! gradient checkpointing a layer keeps only its input, and one layer is rebuilt at a time.
use crate::config::LlamaConfig;

/// The training setup an estimate is for.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Bytes per weight element (2 for bf16).
    pub weight_bytes: u64,
    /// QLoRA: the bits each weight of a base linear takes as stored (codes and scales: 4.5 for
    /// NF4, 4.127 with double quantization, 8.5 for Q8_0); `None` for dense.
    pub linear_bits: Option<f64>,
    /// Bytes per activation element (the activation plan's dtype).
    pub activation_bytes: u64,
    /// `None` for full fine-tuning, else the LoRA parameter count.
    pub lora_params: Option<u64>,
    /// Full fine-tuning keeps f32 master copies of half-precision weights.
    pub master_weights: bool,
    pub gradient_checkpointing: bool,
    /// Sequences and tokens per sequence of one micro-batch.
    pub batch: u64,
    pub seq: u64,
    /// Logit elements the loss computes at once (its chunk).
    pub loss_chunk: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub trainable_params: u64,
    /// LoRA adapters (full fine-tuning: counted in `weights`).
    pub trainable: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.gradients + self.optimizer + self.activations
    }
}

/// Parameters of a LLaMA of this shape.
pub fn parameter_count(m: &LlamaConfig) -> u64 {
    let (h, i, v) = (
        m.hidden_size as u64,
        m.intermediate_size as u64,
        m.vocab_size as u64,
    );
    let q = (m.num_attention_heads * m.head_dim) as u64;
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h;
    let head = if m.tie_word_embeddings { 0 } else { v * h };
    v * h + m.num_hidden_layers as u64 * layer + h + head
}

/// Parameters of the base linears (the seven projections of every layer): what QLoRA keeps
/// quantized.
pub fn linear_parameter_count(m: &LlamaConfig) -> u64 {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let q = (m.num_attention_heads * m.head_dim) as u64;
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    m.num_hidden_layers as u64 * (2 * h * q + 2 * h * kv + 3 * h * i)
}

/// LoRA parameters: r * (in + out) per targeted projection per layer (`all-linear`: all seven).
pub fn lora_parameter_count(m: &LlamaConfig, r: usize, targets: &[String]) -> u64 {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let q = (m.num_attention_heads * m.head_dim) as u64;
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let projections = [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ];
    let all = targets.iter().any(|t| t == "all-linear");
    let per_layer: u64 = projections
        .iter()
        .filter(|(n, _, _)| all || targets.iter().any(|t| t == n))
        .map(|(_, a, b)| r as u64 * (a + b))
        .sum();
    per_layer * m.num_hidden_layers as u64
}

/// The estimate of one training step.
pub fn estimate(m: &LlamaConfig, s: &Setup) -> MemoryEstimate {
    let params = parameter_count(m);
    let weights = match s.linear_bits {
        None => params * s.weight_bytes,
        Some(bits) => {
            let linear = linear_parameter_count(m);
            (params - linear) * s.weight_bytes + (linear as f64 * bits / 8.0).ceil() as u64
        }
    };
    let (trainable_params, trainable, gradients, optimizer) = match s.lora_params {
        Some(n) => (n, n * 4, n * 4, n * 8),
        None => {
            let master = if s.master_weights && s.weight_bytes < 4 {
                params * 4
            } else {
                0
            };
            // The step's gradients in the weights' dtype, summed in f32 by the accumulator;
            // moments in f32.
            (
                params,
                0,
                params * (s.weight_bytes + 4),
                params * 8 + master,
            )
        }
    };
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let q = (m.num_attention_heads * m.head_dim) as u64;
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let ab = s.activation_bytes;
    let tokens = s.batch * s.seq;
    // input, 2 norm outputs, attention output, o_proj and down_proj outputs, residual sum:
    // 6 hidden; q twice, k and v (v once, k twice); gate, up, SwiGLU: 3 intermediate.
    let per_layer =
        tokens * ab * (6 * h + 2 * q + 3 * kv + 3 * i) + tokens * m.num_attention_heads as u64 * 4; // the log-sum-exp the kernel saves
    let layers = m.num_hidden_layers as u64;
    let kept = if s.gradient_checkpointing {
        layers * tokens * h * ab + per_layer
    } else {
        layers * per_layer
    };
    // Embeddings and the final norm; the loss keeps every chunk's logits for the backward
    // (counted positions only: at most all tokens) and builds one chunk's f32 gradient at a time.
    let logits = tokens * m.vocab_size as u64;
    let activations = kept + 2 * tokens * h * ab + logits * ab + s.loss_chunk.min(logits) * 4;
    MemoryEstimate {
        weights,
        trainable_params,
        trainable,
        gradients,
        optimizer,
        activations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_7b_has_6_74_billion_parameters() {
        let cfg = LlamaConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}"#,
        )
        .unwrap();
        assert_eq!(parameter_count(&cfg), 6_738_415_616);
        let lora = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) as u64;
        let s = Setup {
            weight_bytes: 2,
            linear_bits: None,
            activation_bytes: 2,
            lora_params: Some(lora),
            master_weights: true,
            gradient_checkpointing: true,
            batch: 4,
            seq: 1024,
            loss_chunk: 1 << 27,
        };
        let e = estimate(&cfg, &s);
        // bf16 weights (12.55 GiB) plus about 2 GiB with checkpointing.
        let gib = e.total() as f64 / (1u64 << 30) as f64;
        assert!(gib > 13.0 && gib < 16.0, "{gib}");
        let plain = estimate(
            &cfg,
            &Setup {
                gradient_checkpointing: false,
                ..s
            },
        );
        // By hand: a layer keeps 4096 tokens x 2 bytes x (6 x 4096 + 2 x 4096 + 3 x 4096 +
        // 3 x 11008) = 639.6 MB and 0.5 MB of log-sum-exp; 32 layers 20.485 GB. With
        // checkpointing, 32 layer inputs (1.074 GB) and one rebuilt layer (0.640 GB). Both add
        // the embeddings and final norm (67 MB), the kept logits (262 MB) and a chunk's f32
        // gradient (524 MB): 21.339 GB and 2.567 GB.
        let act = |x: &MemoryEstimate| x.activations as f64 / 1e9;
        assert!((act(&plain) - 21.339).abs() < 0.001, "{}", act(&plain));
        assert!((act(&e) - 2.567).abs() < 0.001, "{}", act(&e));
        // QLoRA, NF4: the 6,476,005,376 projection weights at 4.5 bits (3.643 GB) and the
        // other 262,410,240 (embeddings, head, norms) in bf16 (0.525 GB): 4.168 GB, 3.88 GiB.
        let nf4 = estimate(
            &cfg,
            &Setup {
                linear_bits: Some(4.5),
                ..s
            },
        );
        let w = nf4.weights as f64 / 1e9;
        assert!((w - 4.1676).abs() < 0.0001, "{w}");
    }
}
