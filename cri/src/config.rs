//! The daemon's configuration: flags, or a TOML file with the same keys
//! (flags win).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::image::disk::{DiskFormat, ErofsCompression};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Every key of the file; each is also a `frakti daemon` flag.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<PathBuf>,
    #[serde(alias = "state-dir")]
    pub root: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernels_dir: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    pub default_cpus: Option<u32>,
    pub default_memory: Option<u64>,
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    pub streaming_addr: Option<String>,
    pub streaming_tls_cert: Option<PathBuf>,
    pub streaming_tls_key: Option<PathBuf>,
    pub empty_dir_size: Option<u64>,
    pub socket_group: Option<String>,
    pub certs_dir: Option<PathBuf>,
    pub docker_config: Option<PathBuf>,
    pub image_disk_format: Option<DiskFormat>,
    pub erofs_compression: Option<ErofsCompression>,
    pub max_parallel_pulls: Option<usize>,
    pub log_level: Option<String>,
    pub network: Option<NetworkMode>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dir: Option<Vec<PathBuf>>,
    pub cni_plugin_timeout: Option<u64>,
    pub netns_dir: Option<PathBuf>,
}

/// How pods are networked (`--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The node's CNI configuration.
    Cni,
    /// A loopback only.
    None,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_use_the_flags_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frakti.toml");
        std::fs::write(
            &path,
            "listen = \"/run/x.sock\"\nimage-disk-format = \"ext4\"\nmax-parallel-pulls = 2\n",
        )
        .unwrap();
        let config = FileConfig::load(&path).unwrap();
        assert_eq!(config.listen.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!(config.image_disk_format, Some(DiskFormat::Ext4));
        std::fs::write(
            &path,
            "network = \"none\"\ncni-bin-dir = [\"/a\", \"/b\"]\ncni-plugin-timeout = 5\n",
        )
        .unwrap();
        let config = FileConfig::load(&path).unwrap();
        assert_eq!(config.network, Some(NetworkMode::None));
        assert_eq!(config.cni_bin_dir.unwrap().len(), 2);
        std::fs::write(&path, "listen = 5\n").unwrap();
        assert!(FileConfig::load(&path).is_err());
        std::fs::write(&path, "no-such-key = 1\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("no-such-key"), "{err}");
    }
}
