//! The fuzz targets without libFuzzer, on stable Rust
//! (`cargo run --release --no-default-features --example replay -- ARGS`):
//!
//! ```text
//! replay TARGET PATH...        run TARGET on each file (directories: their files)
//! replay TARGET --mutate N     run TARGET on N random mutations of its seeds
//! replay --write-seeds DIR     write the seed inputs to DIR/<target>/<name>
//! ```
//!
//! TARGET is `block_request`, `mmio_transport`, `vsock_packet`, `net_tx` or `api_request`. A failing input found by
//! `--mutate` is saved to `artifacts/<target>/crash-<n>`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use frakti_vmm_fuzz::{api, block_request, mmio_transport, net, seeds, vsock_packet};

type Target = fn(&[u8]);
type Seeds = fn() -> Vec<(&'static str, Vec<u8>)>;

fn target(name: &str) -> Option<(Target, Seeds)> {
    match name {
        "block_request" => Some((block_request as Target, seeds::block_request as Seeds)),
        "mmio_transport" => Some((mmio_transport, seeds::mmio_transport)),
        "vsock_packet" => Some((vsock_packet, seeds::vsock_packet)),
        "net_tx" => Some((net::net_tx, net::seeds)),
        "api_request" => Some((api::api_request, api::seeds)),
        _ => None,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, dir] if flag == "--write-seeds" => write_seeds(Path::new(dir)),
        [name, flag, n] if flag == "--mutate" => match (target(name), n.parse()) {
            (Some((run, seeds)), Ok(n)) => mutate(name, run, seeds, n),
            _ => Err(usage()),
        },
        [name, paths @ ..] if !paths.is_empty() => match target(name) {
            Some((run, _)) => replay(run, paths),
            None => Err(usage()),
        },
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: replay block_request|mmio_transport|vsock_packet|net_tx (PATH...|--mutate N) | replay --write-seeds DIR"
        .to_string()
}

fn write_seeds(dir: &Path) -> Result<(), String> {
    for (name, seeds) in [
        ("block_request", seeds::block_request()),
        ("mmio_transport", seeds::mmio_transport()),
        ("vsock_packet", seeds::vsock_packet()),
        ("net_tx", net::seeds()),
        ("api_request", api::seeds()),
    ] {
        let target_dir = dir.join(name);
        std::fs::create_dir_all(&target_dir).map_err(|e| e.to_string())?;
        for (seed, bytes) in seeds {
            std::fs::write(target_dir.join(seed), bytes).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn replay(run: Target, paths: &[String]) -> Result<(), String> {
    let mut files = Vec::new();
    for path in paths.iter().map(PathBuf::from) {
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|e| e.to_string())?;
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        } else {
            files.push(path);
        }
    }
    files.sort();
    let start = Instant::now();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        run(&bytes);
    }
    println!(
        "replayed {} inputs in {:.1}s",
        files.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A small xorshift generator: reproducible runs without dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Flips, overwrites and truncates random bytes of a random seed.
fn mutation(rng: &mut Rng, seeds: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..=rng.below(8) {
        let at = rng.below(bytes.len().min(0x1000));
        match rng.below(4) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next() as u8,
            2 => bytes[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
            _ => bytes.truncate(at.max(1)),
        }
        if bytes.is_empty() {
            break;
        }
    }
    bytes
}

fn mutate(name: &str, run: Target, seeds: Seeds, n: u64) -> Result<(), String> {
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    for i in 0..n {
        let input = mutation(&mut rng, &seeds);
        if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
            let dir = Path::new("artifacts").join(name);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let path = dir.join(format!("crash-{i}"));
            std::fs::write(&path, &input).map_err(|e| e.to_string())?;
            return Err(format!("input {i} failed; saved to {}", path.display()));
        }
    }
    println!(
        "{name}: {n} mutated inputs in {:.1}s, no failure",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
