#![no_main]

//! What a CNI conf dir and plugins hand the daemon: configuration files and
//! ADD results. Parsed or refused, never a panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frakti_cri_fuzz::cni_documents(data));
