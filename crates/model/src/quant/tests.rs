use super::*;

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-0.1f32..0.1))
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// GGML blocks kept in place dequantize, whole or by rows, to exactly candle's dequantization
/// (the GGUF import's), and a row order moves whole rows.
#[test]
fn ggml_blocks_dequantize_as_candle_by_rows_and_in_row_order() {
    let w = random(12, 256, 1);
    for ty in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, ty).unwrap();
        let want = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let kept = QuantWeight::from_qtensor(&q, None, DType::F32).unwrap();
        let mut rows = vec![0f32; 3 * 256];
        kept.dequantize_rows(4, 7, &mut rows).unwrap();
        for (i, r) in (4..7).enumerate() {
            let got = &rows[i * 256..(i + 1) * 256];
            assert!(
                got.iter()
                    .zip(&want[r])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty:?} row {r}"
            );
        }
        let order: Vec<usize> = (0..12).rev().collect();
        let moved = QuantWeight::from_qtensor(&q, Some(&order), DType::F32).unwrap();
        let all = moved
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(all[0], want[11], "{ty:?}: row order");
        assert_eq!(
            moved.stored_bytes(),
            12 * 256 / ty.block_size() * ty.type_size()
        );
    }
}

/// A bf16 model's quantized weight holds bf16 values: rounded once, after the dequantization.
#[test]
fn dequantized_values_are_rounded_through_the_model_dtype() {
    let w = random(4, 64, 2);
    let q = QuantWeight::quantize(&w, Quantize::Nf4, false, DType::BF16).unwrap();
    let mut v = vec![0f32; 4 * 64];
    q.dequantize_rows(0, 4, &mut v).unwrap();
    assert!(v.iter().all(|x| bf16::from_f32(*x).to_f32() == *x));
    let q32 = QuantWeight::quantize(&w, Quantize::Nf4, false, DType::F32).unwrap();
    let mut v32 = vec![0f32; 4 * 64];
    q32.dequantize_rows(0, 4, &mut v32).unwrap();
    assert!(v
        .iter()
        .zip(&v32)
        .all(|(a, b)| *a == bf16::from_f32(*b).to_f32()));
    assert!(QuantWeight::quantize(&w, Quantize::Gguf, false, DType::F32).is_err());
}

#[test]
fn only_the_projections_of_the_decoder_layers_are_quantized() {
    assert!(is_quantized_linear(
        "model.layers.0.self_attn.q_proj.weight"
    ));
    assert!(is_quantized_linear("model.layers.11.mlp.down_proj.weight"));
    assert!(!is_quantized_linear("model.layers.0.self_attn.q_proj.bias"));
    assert!(!is_quantized_linear(
        "model.layers.0.input_layernorm.weight"
    ));
    assert!(!is_quantized_linear("model.embed_tokens.weight"));
    assert!(!is_quantized_linear("lm_head.weight"));
}

/// Any range of values (odd starts and ends, across blocks) dequantizes as the whole does.
#[test]
fn nf4_ranges_dequantize_as_the_whole() {
    let w = random(3, 100, 3);
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let q = nf4::Nf4::quantize(&v, true);
    let mut all = vec![0f32; 300];
    q.dequantize_to(DType::BF16, 0, &mut all);
    for (s, e) in [
        (0, 1),
        (1, 2),
        (1, 64),
        (63, 130),
        (64, 128),
        (127, 300),
        (5, 6),
        (299, 300),
    ] {
        let mut part = vec![0f32; e - s];
        q.dequantize_to(DType::BF16, s, &mut part);
        assert_eq!(part, all[s..e], "{s}..{e}");
    }
}
