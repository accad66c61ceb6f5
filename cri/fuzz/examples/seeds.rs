//! Writes the seed layers to DIR (`cargo run --no-default-features
//! --example seeds -- corpus/layer_tar`).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: seeds DIR");
        return ExitCode::FAILURE;
    };
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        frakti_cri_fuzz::seeds()
            .into_iter()
            .try_for_each(|(name, layer)| std::fs::write(dir.join(name), layer))
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
