#![no_main]

//! What a WebSocket client sends the streaming server: one message, under
//! any of the channel protocols. No input may panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frakti_cri_fuzz::websocket_messages(data));
