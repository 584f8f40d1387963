//! Issue 3: the real SmolLM2 GGUF from PyPI is put, inspected and verified,
//! with the metadata its header states.

mod store_support;
use store_support::*;

#[test]
fn real_gguf_put_inspect_verify_issue_3() {
    let Some(model) = model("real_gguf_put_inspect_verify_issue_3") else {
        return;
    };
    let dir = Scratch::new("gguf");
    let store = dir.path("store");
    let digest = put(&store, &model, &["--name", "smollm2-135m-instruct:q4_1", "--pin"]);
    assert_eq!(digest, sha256sum(&model));
    assert!(
        digest.starts_with("sha256:b179c952") && digest.ends_with("110db53"),
        "{digest}"
    );

    let info = json(&store, &["inspect", "smollm2-135m-instruct:q4_1"]);
    assert_eq!(info["size_bytes"], 98_362_432);
    assert_eq!(info["chunk_count"], 6);
    let g = &info["gguf"];
    assert_eq!(g["version"], 3);
    assert_eq!(g["architecture"], "llama");
    assert_eq!(g["quantization"], "Q4_1");
    assert_eq!(g["size_label"], "135M");
    assert_eq!(g["context_length"], 8192);
    assert_eq!(g["tensor_count"], 272);
    // The tensor shapes add up to the model's 135M parameters.
    let params = g["parameter_count"].as_u64().unwrap();
    assert!((130_000_000..140_000_000).contains(&params), "{params}");
    assert_eq!(info["refs"][0]["pinned"], true);

    let text = ok(&store, &["inspect", &digest]);
    assert!(
        text.contains("architecture: llama") && text.contains("quantization: Q4_1"),
        "{text}"
    );
    let v = json(&store, &["verify", "--full", "smollm2-135m-instruct:q4_1"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["blobs"][0]["full_ok"], true);
}

#[test]
fn non_gguf_blobs_report_no_metadata() {
    let dir = Scratch::new("nogguf");
    let store = dir.path("store");
    let f = dir.path("f");
    // GGUF magic followed by garbage: no facts are invented from it.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(noise(10_000, 5));
    std::fs::write(&f, &bytes).unwrap();
    let d = put(&store, &f, &[]);
    let info = json(&store, &["inspect", &d]);
    assert!(info["gguf"].is_null(), "{info}");
}
