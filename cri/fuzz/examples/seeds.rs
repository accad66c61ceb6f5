//! Writes a target's seeds to DIR (`cargo run --no-default-features
//! --example seeds -- corpus/layer_tar`, or `-- corpus/spdy_frames
//! spdy_frames`; the target is `layer_tar` when not given).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: seeds DIR [layer_tar|spdy_frames]");
        return ExitCode::FAILURE;
    };
    let seeds = match args.next().as_ref().and_then(|t| t.to_str()) {
        None | Some("layer_tar") => frakti_cri_fuzz::seeds(),
        Some("spdy_frames") => frakti_cri_fuzz::spdy_seeds(),
        Some(other) => {
            eprintln!("no seeds for target {other:?}");
            return ExitCode::FAILURE;
        }
    };
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        seeds
            .into_iter()
            .try_for_each(|(name, seed)| std::fs::write(dir.join(name), seed))
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
