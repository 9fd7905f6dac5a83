//! NF4 against bitsandbytes, bit for bit: the codes, the absmax (plain and double-quantized)
//! and the dequantized values in f32, bf16 and f16 that bitsandbytes 0.50 wrote on the CPU
//! (tests/fixtures/qlora/nf4.safetensors, from scripts/make-qlora-fixtures).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sft_model::quant::nf4::{Nf4, DYNAMIC};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/qlora/nf4.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("read the NF4 fixtures")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

const CASES: [&str; 3] = ["bf16_96x128", "f32_7x100", "f32_40x576"];

#[test]
fn dynamic_map_is_bitsandbytes() {
    let f = fixtures();
    let want = bits(&f["dynamic_map"]);
    let got: Vec<u32> = DYNAMIC.iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, want);
}

#[test]
fn quantize_and_dequantize_equal_bitsandbytes() {
    let f = fixtures();
    for case in CASES {
        let w = f[&format!("{case}.weight")]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for dq in [false, true] {
            let tag = format!("{case}.{}", if dq { "dq" } else { "plain" });
            let q = Nf4::quantize(&w, dq);
            assert_eq!(
                q.packed(),
                u8s(&f[&format!("{tag}.packed")]),
                "{tag}: codes"
            );
            match q.nested() {
                None => {
                    let want = bits(&f[&format!("{tag}.absmax")]);
                    let got: Vec<u32> = q.absmax().iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{tag}: absmax");
                }
                Some((codes, absmax2, offset)) => {
                    assert_eq!(
                        codes,
                        u8s(&f[&format!("{tag}.qabsmax")]),
                        "{tag}: 8-bit absmax"
                    );
                    let want = bits(&f[&format!("{tag}.absmax2")]);
                    let got: Vec<u32> = absmax2.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{tag}: absmax of the absmax");
                    assert_eq!(
                        offset.to_bits(),
                        bits(&f[&format!("{tag}.offset")])[0],
                        "{tag}: offset"
                    );
                }
            }
            for (dt, dn) in [
                (DType::F32, "f32"),
                (DType::BF16, "bf16"),
                (DType::F16, "f16"),
            ] {
                let mut out = vec![0f32; w.len()];
                q.dequantize_to(dt, 0, &mut out);
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                let want = bits(&f[&format!("{tag}.deq_{dn}")]);
                let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    bad,
                    0,
                    "{tag}: {bad} of {} dequantized {dn} values differ",
                    w.len()
                );
            }
        }
    }
}
