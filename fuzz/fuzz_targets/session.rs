//! The session layer driven by arbitrary client byte streams, through the
//! deterministic simulator (`cnse_server::sim::run_script`): clients the
//! fuzzer writes connect, send any bytes cut anywhere, read or stop
//! reading, and leave; time jumps across every timeout. Checked after every
//! event: the session's invariants (bounded tables, slots free or open,
//! memory accounting, the transport used as a kernel allows); everything
//! the server sends is well-formed; HELLO_ACK, TOKENS and END only to a
//! client that authenticated and on streams it opened; no backend work
//! while no client authenticated; and at the end everything comes back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|script: &[u8]| {
    if let Err(e) = cnse_server::sim::run_script(script) {
        panic!("session invariant broken: {e}");
    }
});
