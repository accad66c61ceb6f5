#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frakti_vmm_fuzz::api::api_request(data));
