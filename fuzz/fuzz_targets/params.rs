//! REQUEST payload parsing:
//! - never panics;
//! - gives exactly the page's error for each invalid field, in the page's
//!   order (an independent model here), under two server limits;
//! - whatever it accepts is in range and round-trips through
//!   `Params::encode`, and the prompt is the payload's tail, in place.
#![no_main]

use cnse_proto::{code, ParamLimits, Params, PARAMS_BYTES};
use libfuzzer_sys::fuzz_target;

fn model(data: &[u8], max_tokens_limit: u32) -> Result<(), &'static str> {
    if data.len() < PARAMS_BYTES {
        return Err("request payload shorter than the 32-byte parameter block");
    }
    let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    let (max_tokens, temperature, top_p) = (u32_at(0), f32::from_bits(u32_at(4)), f32::from_bits(u32_at(8)));
    if u32_at(28) != 0 {
        return Err("reserved parameter field must be 0");
    }
    if max_tokens == 0 {
        return Err("max_tokens must be > 0");
    }
    if max_tokens > max_tokens_limit {
        return Err("max_tokens above the server's limit");
    }
    if temperature.is_nan() || temperature.is_infinite() || temperature.is_sign_negative() && temperature != 0.0 {
        return Err("temperature must be finite and >= 0");
    }
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err("top_p must be in (0, 1]");
    }
    if std::str::from_utf8(&data[PARAMS_BYTES..]).is_err() {
        return Err("prompt is not valid UTF-8");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    for max_tokens_limit in [cnse_proto::MAX_TOKENS_LIMIT_DEFAULT, 1000] {
        let limits = ParamLimits { max_tokens_limit };
        let got = Params::parse(data, &limits);
        match (&got, model(data, max_tokens_limit)) {
            (Ok(req), Ok(())) => {
                let p = req.params;
                assert!(p.max_tokens > 0 && p.max_tokens <= limits.max_tokens_limit);
                assert!(p.temperature.is_finite() && p.temperature >= 0.0);
                assert!(p.top_p > 0.0 && p.top_p <= 1.0);
                assert_eq!(&p.encode()[..], &data[..PARAMS_BYTES]);
                assert_eq!(req.prompt.as_bytes(), &data[PARAMS_BYTES..]);
                assert_eq!(
                    req.prompt.as_ptr(),
                    data[PARAMS_BYTES..].as_ptr(),
                    "prompt borrowed in place"
                );
            }
            (Err((c, m)), Err(want)) => assert_eq!((*c, *m), (code::BAD_REQUEST, want)),
            (got, want) => panic!("parse gave {got:?}, the page says {want:?}"),
        }
    }
});
