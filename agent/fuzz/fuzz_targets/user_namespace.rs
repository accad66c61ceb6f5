#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frakti_agent_fuzz::user_namespace(data));
