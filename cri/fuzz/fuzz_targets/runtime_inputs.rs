#![no_main]

//! What the runtime reads from hostile sources: an image's /etc/passwd,
//! /etc/group and `User` (CreateContainer resolves users in them), a
//! container's output (the CRI log encoder), and a pod's annotations (the
//! VM sizing rule). None may panic; the log encoder must lose nothing.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frakti_cri_fuzz::runtime_inputs(data));
