//! Tokenization and masking: only the response and its EOS train, the boundary is exact, and
//! truncation is counted.
mod common;

use common::*;
use serde_json::json;
use sft_data::{build_dataset, Encoder, Record, Template, TemplateSpec, TokenizerFiles};

fn build(dir: &std::path::Path, rows: &[serde_json::Value], extra: &str) -> sft_data::Dataset {
    let f = dir.join(format!("d{}.jsonl", rows.len()));
    write_jsonl(&f, rows);
    let tok = TokenizerFiles::from_dir(&byte_tokenizer(&dir.join("tok"))).unwrap();
    build_dataset(
        &config(
            &format!("  - path: {}", f.display()),
            &format!("cache: false\n{extra}"),
        ),
        &tok,
        &options(dir),
    )
    .unwrap()
}

#[test]
fn only_the_response_and_eos_train() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        json!({"prompt": "Why is sky blue?", "response": "Rayleigh scattering."}),
        json!({"prompt": "Name 3 colours", "response": "Red, green, blue."}),
    ];
    let ds = build(dir.path(), &rows, "template: alpaca_modified");
    for (i, r) in rows.iter().enumerate() {
        let e = ds.train.get(i);
        let prompt = format!("{}### Response:", r["prompt"].as_str().unwrap());
        let mut want_prompt = vec![BOS];
        want_prompt.extend(bytes_ids(&prompt));
        let mut want_trained = bytes_ids(r["response"].as_str().unwrap());
        want_trained.push(EOS);
        assert_eq!(&e.ids[..e.prompt_len], &want_prompt[..]);
        assert_eq!(e.trained(), &want_trained[..]);
        let labels = e.labels();
        assert!(labels[..e.prompt_len].iter().all(|&l| l == -100));
        assert_eq!(
            labels[e.prompt_len..]
                .iter()
                .map(|&l| l as u32)
                .collect::<Vec<_>>(),
            want_trained
        );
    }
    assert_eq!(ds.report.trained_tokens, ds.train.token_counts().1);
    assert_eq!(ds.report.boundary_retokenized, 0);
}

#[test]
fn a_token_across_the_boundary_is_retokenized() {
    let dir = tempfile::tempdir().unwrap();
    // Raw template: prompt "xa" + response "by": the merge `a b` would straddle the boundary.
    // A merge inside the response ("ab" in "cab") stays one token.
    let rows = vec![
        json!({"prompt": "xa", "response": "by"}),
        json!({"prompt": "x", "response": "cab"}),
    ];
    let ds = build(dir.path(), &rows, "template: raw");
    let e = ds.train.get(0);
    assert_eq!(
        e.ids,
        &[BOS, b'x' as u32, b'a' as u32, b'b' as u32, b'y' as u32, EOS]
    );
    assert_eq!(e.prompt_len, 3);
    let e = ds.train.get(1);
    assert_eq!(e.trained(), &[b'c' as u32, 260, EOS]);
    assert_eq!(ds.report.boundary_retokenized, 1);
}

#[test]
fn chatml_and_chat_template_end_markers() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![json!({"prompt": "Hi", "response": "Hello"})];
    // EOS `</s>`: the ChatML end marker trains, then the EOS.
    let ds = build(dir.path(), &rows, "template: chatml");
    let e = ds.train.get(0);
    let mut want = bytes_ids("Hello");
    want.extend([IM_END, EOS]);
    assert_eq!(e.trained(), &want[..]);
    let mut prompt = vec![BOS, IM_START];
    prompt.extend(bytes_ids("user\nHi"));
    prompt.push(IM_END);
    prompt.extend(bytes_ids("\n"));
    prompt.push(IM_START);
    prompt.extend(bytes_ids("assistant\n"));
    assert_eq!(&e.ids[..e.prompt_len], &prompt[..]);
    // EOS `<|im_end|>`: the marker is the EOS, nothing more.
    let ds = build(dir.path(), &rows, "template: chatml\neos_token: <|im_end|>");
    let mut want = bytes_ids("Hello");
    want.push(IM_END);
    assert_eq!(ds.train.get(0).trained(), &want[..]);
    // The tokenizer's own chat template (tokenizer_config.json) renders the same prompt here;
    // the response is cut after its last EOS (`<|im_end|>`), the newline after it does not train.
    let ds2 = build(
        dir.path(),
        &rows,
        "template: chat_template\neos_token: <|im_end|>",
    );
    assert_eq!(ds2.train.get(0).ids, ds.train.get(0).ids);
}

#[test]
fn truncation_drop_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        json!({"prompt": "Q", "response": "short"}), // 1 + 1 + 5 + 1 = 8 tokens
        json!({"prompt": "Q", "response": "a much longer reply"}), // 1 + 1 + 19 + 1 = 22
        json!({"prompt": "a long long question", "response": "r"}), // 1 + 20 + 1 + 1 = 23
    ];
    let ds = build(dir.path(), &rows, "template: raw\nmax_length: 12");
    assert_eq!(ds.report.kept, 1);
    assert_eq!(ds.report.truncated, 2);
    assert_eq!(ds.report.skipped.get("over_max_length"), Some(&2));
    let ds = build(
        dir.path(),
        &rows,
        "template: raw\nmax_length: 12\ntruncation: cut",
    );
    assert_eq!(ds.report.kept, 2);
    assert_eq!(ds.report.truncated, 2);
    assert_eq!(ds.report.skipped.get("prompt_over_max_length"), Some(&1));
    let e = ds.train.get(1);
    assert_eq!(e.ids.len(), 12);
    assert_eq!(e.trained(), &bytes_ids("a much lon")[..]); // cut: no EOS
    assert_eq!(
        ds.report.rows_read,
        ds.report.kept + ds.report.skipped.values().sum::<u64>()
    );
}

#[test]
fn evaluator_prompts_match_training_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![json!({"prompt": "Write a haiku", "response": "Leaves fall."})];
    for t in [
        "alpaca_modified",
        "alpaca_modified_nl",
        "alpaca",
        "chatml",
        "chat_template",
    ] {
        let ds = build(dir.path(), &rows, &format!("template: {t}"));
        let files = TokenizerFiles::from_dir(&dir.path().join("tok")).unwrap();
        let cfg = config("  - path: x.jsonl", &format!("template: {t}"));
        let (enc, tmpl) = sft_data::dataset::load_encoder_and_template(&cfg, &files).unwrap();
        let prompt = tmpl.render_prompt("Write a haiku").unwrap();
        let ids = enc.encode_prompt(&prompt).unwrap();
        let e = ds.train.get(0);
        assert_eq!(ids, &e.ids[..e.prompt_len], "{t}");
    }
}

#[test]
fn real_tokenizer_minilm_prefix_and_boundary() {
    // BERT's post-processor adds [CLS] before and [SEP] after: the prefix is [CLS], the EOS
    // falls back to [SEP] (no eos_token in its tokenizer_config.json).
    let dir = model_dir("all-minilm-l6-v2");
    let files = TokenizerFiles::from_dir(&dir).unwrap();
    let enc = Encoder::load(&files, None).unwrap();
    assert_eq!(enc.prefix_ids, vec![101]);
    assert_eq!((enc.eos_token.as_str(), enc.eos_id), ("[SEP]", 102));
    let t = Template::new(&TemplateSpec::AlpacaModifiedNl, &enc.eos_token, None, None).unwrap();
    // Longer than the 128 tokens its tokenizer.json truncates to: that setting is ignored.
    let long = "A systems programming language. ".repeat(40);
    let r = t
        .render(&Record::new("What is Rust?", long.as_str()))
        .unwrap();
    let e = &enc.encode_batch(std::slice::from_ref(&r)).unwrap()[0];
    let tk = enc.tokenizer();
    let mut want = tk
        .encode(r.response.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    want.push(102);
    assert_eq!(&e.ids[e.prompt_len..], &want[..]);
    assert_eq!(
        &e.ids[1..e.prompt_len],
        tk.encode(r.prompt.as_str(), false).unwrap().get_ids()
    );
    assert!(!e.retokenized);
    assert!(e.ids.len() > 200);
}

#[test]
fn real_tokenizer_smollm2_round_trips() {
    let dir = model_dir("smollm2-135m-instruct");
    let files = TokenizerFiles::from_dir(&dir).unwrap();
    let enc = Encoder::load(&files, None).unwrap();
    for spec in [
        TemplateSpec::AlpacaModified,
        TemplateSpec::AlpacaModifiedNl,
        TemplateSpec::Chatml,
    ] {
        let t = Template::new(&spec, &enc.eos_token, None, None).unwrap();
        for (i, rs) in [
            ("Why is the sky blue?", "Because of Rayleigh scattering."),
            ("List two fruits", " apples and pears\n"),
        ] {
            let r = t.render(&Record::new(i, rs)).unwrap();
            let e = &enc.encode_batch(std::slice::from_ref(&r)).unwrap()[0];
            let (prompt, trained) = e.ids.split_at(e.prompt_len);
            assert_eq!(enc.decode(prompt).unwrap(), r.prompt, "{spec:?}");
            let trained_text = enc.decode(trained).unwrap();
            let eos = if r.append_eos {
                enc.eos_token.as_str()
            } else {
                ""
            };
            assert_eq!(trained_text, format!("{}{eos}", r.response), "{spec:?}");
        }
    }
}

#[test]
fn smollm2_own_chat_template() {
    let dir = model_dir("smollm2-135m-instruct");
    let files = TokenizerFiles::from_dir(&dir).unwrap();
    let cfg = config("  - path: x.jsonl", "template: chat_template");
    let (enc, t) = sft_data::dataset::load_encoder_and_template(&cfg, &files).unwrap();
    assert_eq!(enc.eos_token, "<|im_end|>");
    let r = t
        .render(&Record::new("Why is the sky blue?", "Rayleigh scattering."))
        .unwrap();
    assert_eq!(
        r.prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        (r.response.as_str(), r.append_eos),
        ("Rayleigh scattering.<|im_end|>", false)
    );
    let e = &enc.encode_batch(std::slice::from_ref(&r)).unwrap()[0];
    assert_eq!(*e.ids.last().unwrap(), enc.eos_id);
    assert_eq!(enc.decode(&e.ids[e.prompt_len..]).unwrap(), r.response);
    assert!(!e.retokenized);
}
