#![no_main]

//! What a SPDY client sends the streaming server: a byte stream of frames
//! (split at arbitrary points) and the zlib header blocks inside them. No
//! input may panic, buffer more than one frame, or decode to a frame that
//! does not re-encode to itself.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frakti_cri_fuzz::spdy_frames(data));
