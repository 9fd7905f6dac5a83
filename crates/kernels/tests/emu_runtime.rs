//! The emulator's runtime on its own: a kernel from the table runs over host memory, and the
//! table carries each kernel's parameter types.
use std::ffi::c_void;

use sft_kernels::emu::{self, Elem, Param};

#[test]
fn table_lists_every_module_and_parameter_types() {
    for (module, names) in sft_kernels::MODULES {
        for name in *names {
            assert!(emu::kernel(module, name).is_some(), "{module}/{name}");
        }
    }
    let k = emu::kernel("norm", "rms_norm_fwd_bf16").unwrap();
    assert_eq!(
        k.params,
        vec![
            Param::Ptr {
                elem: Elem::BF16,
                is_const: true
            },
            Param::Ptr {
                elem: Elem::BF16,
                is_const: true
            },
            Param::Ptr {
                elem: Elem::BF16,
                is_const: false
            },
            Param::Int {
                signed: true,
                bytes: 4
            },
            Param::Float { bytes: 4 },
        ]
    );
    assert_eq!(
        emu::kernel("attention", "attn_fwd_bf16_64")
            .unwrap()
            .max_threads,
        128
    );
    assert!(emu::kernel("norm", "no_such_kernel").is_none());
}

#[test]
fn rms_norm_runs_on_host_memory() {
    let (rows, d) = (3usize, 300usize);
    let x: Vec<f32> = (0..rows * d)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / d as f32).collect();
    let mut y = vec![f32::NAN; rows * d];
    let k = emu::kernel("norm", "rms_norm_fwd_f32").unwrap();
    let (mut xp, mut wp, mut yp) = (x.as_ptr(), w.as_ptr(), y.as_mut_ptr());
    let (mut dd, mut eps) = (d as i32, 1e-5f32);
    let mut args: Vec<*mut c_void> = vec![
        &mut xp as *mut _ as *mut c_void,
        &mut wp as *mut _ as *mut c_void,
        &mut yp as *mut _ as *mut c_void,
        &mut dd as *mut _ as *mut c_void,
        &mut eps as *mut _ as *mut c_void,
    ];
    // SAFETY: the arguments are the kernel's, the buffers hold rows * d and d elements.
    unsafe { emu::launch(k, &mut args, [rows as u32, 1, 1], [320, 1, 1], 0) }.unwrap();
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        for j in 0..d {
            let want = row[j] * inv * w[j];
            assert!((y[r * d + j] - want).abs() < 1e-5, "row {r} col {j}");
        }
    }
}
