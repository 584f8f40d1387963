//! REQUEST payload parsing never panics, and whatever it accepts is in range
//! and round-trips through `Params::encode`.
#![no_main]

use cnse_proto::{ParamLimits, Params};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = ParamLimits::default();
    if let Ok(req) = Params::parse(data, &limits) {
        let p = req.params;
        assert!(p.max_tokens > 0 && p.max_tokens <= limits.max_tokens_limit);
        assert!(p.temperature.is_finite() && p.temperature >= 0.0);
        assert!(p.top_p > 0.0 && p.top_p <= 1.0);
        assert_eq!(&p.encode()[..], &data[..32]);
        assert_eq!(req.prompt.as_bytes(), &data[32..]);
    }
});
