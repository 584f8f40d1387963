//! The GGUF header reader on arbitrary bytes:
//! - never panics (overflow checks are on in fuzz builds);
//! - accepts only what starts with the magic and a version it supports;
//! - reads the header only: bytes after an accepted header change nothing;
//! - states only what the header says (a context length needs an
//!   architecture; a parameter count needs tensors).
#![no_main]

use cnse_store::gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(info) = gguf::parse(data) else {
        return;
    };
    assert!(gguf::is_gguf(data));
    assert!((2..=3).contains(&info.version));
    assert!(info.context_length.is_none() || info.architecture.is_some());
    assert!(info.parameter_count.is_none() || info.tensor_count > 0);
    // Every string it kept came from the input.
    for s in [&info.architecture, &info.model_name, &info.size_label]
        .into_iter()
        .flatten()
    {
        assert!(s.len() <= data.len());
    }
    let mut longer = data.to_vec();
    longer.extend_from_slice(&[0xff; 64]);
    assert_eq!(gguf::parse(&longer), Ok(info));
});
