//! Reading configuration from a single file or from a directory of per-endpoint files
//! (the layout of a mounted ConfigMap), and turning the bytes into a validated config.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::validate::{validate, ValidationErrors};
use super::yaml_error;
use super::{EndpointConfig, ExpectedEndpoints, SidecarConfig};

#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// One YAML (or JSON) file holding a whole [`SidecarConfig`].
    File(PathBuf),
    /// A directory with one YAML (or JSON) file per endpoint, each an [`EndpointConfig`].
    /// Hidden entries (the kubelet's `..data` and timestamped directories) are skipped.
    Dir(PathBuf),
    /// A `Dir` that an injected pod mounts: the endpoints it expects may not all have a file
    /// yet, so an empty directory is valid, and the expected ones absent are reported missing.
    ExpectingDir {
        dir: PathBuf,
        expected: ExpectedEndpoints,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The message is libyaml's, which is a fixed text and a position.
    #[error("{path}: not valid YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    /// The message names the field and the kind of problem, never the value (see `yaml_error`).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: no endpoint files (*.yaml, *.yml, *.json) found")]
    EmptyDir { path: PathBuf },
    #[error("{path}: invalid configuration: {errors}")]
    Invalid {
        path: PathBuf,
        errors: ValidationErrors,
    },
}

/// The bytes of every config file, read but not yet parsed. Comparing two of these is how
/// the reloader notices a change without re-parsing on every poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawConfig {
    files: Vec<(PathBuf, Vec<u8>)>,
}

/// A configuration that parsed and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    pub config: SidecarConfig,
    /// SHA-256 of the config files' names and contents (hex), shown on `/readyz` so that an
    /// operator can tell which rendering a sidecar is serving.
    pub hash: String,
    /// Endpoints expected (`ExpectingDir`) that no file defines yet, in the order given.
    pub missing: Vec<String>,
    /// Loaded for an injected pod (`ExpectingDir`), whose pieces arrive one by one.
    pub expecting: bool,
}

impl ConfigSource {
    pub fn path(&self) -> &Path {
        match self {
            Self::File(p) | Self::Dir(p) | Self::ExpectingDir { dir: p, .. } => p,
        }
    }

    pub fn read(&self) -> Result<RawConfig, LoadError> {
        let files = match self {
            Self::File(path) => vec![(path.clone(), read_file(path)?)],
            Self::Dir(dir) | Self::ExpectingDir { dir, .. } => {
                let mut files = Vec::new();
                for path in endpoint_files(dir)? {
                    let bytes = read_file(&path)?;
                    files.push((path, bytes));
                }
                if files.is_empty() && matches!(self, Self::Dir(_)) {
                    return Err(LoadError::EmptyDir { path: dir.clone() });
                }
                files
            }
        };
        Ok(RawConfig { files })
    }

    pub fn load(&self) -> Result<LoadedConfig, LoadError> {
        self.read()?.parse(self)
    }
}

impl RawConfig {
    pub fn parse(&self, source: &ConfigSource) -> Result<LoadedConfig, LoadError> {
        let config = match source {
            ConfigSource::File(_) => {
                let (path, bytes) = &self.files[0];
                parse_yaml::<SidecarConfig>(path, bytes)?
            }
            ConfigSource::Dir(_) | ConfigSource::ExpectingDir { .. } => SidecarConfig {
                endpoints: self
                    .files
                    .iter()
                    .map(|(path, bytes)| parse_yaml::<EndpointConfig>(path, bytes))
                    .collect::<Result<_, _>>()?,
            },
        };
        let missing = match source {
            ConfigSource::ExpectingDir { expected, .. } => {
                expected.missing(|name| config.endpoints.iter().any(|e| e.name == name))
            }
            ConfigSource::File(_) | ConfigSource::Dir(_) => Vec::new(),
        };
        // Nothing arrived yet is a valid state for an injected pod, which validation (made
        // for configs a person writes) would refuse as "at least one endpoint is required".
        let waiting_for_all =
            config.endpoints.is_empty() && matches!(source, ConfigSource::ExpectingDir { .. });
        if !waiting_for_all {
            validate(&config).map_err(|errors| LoadError::Invalid {
                path: source.path().to_path_buf(),
                errors,
            })?;
        }
        Ok(LoadedConfig {
            config,
            hash: self.hash(),
            missing,
            expecting: matches!(source, ConfigSource::ExpectingDir { .. }),
        })
    }

    fn hash(&self) -> String {
        config_hash(self.files.iter().map(|(path, bytes)| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            (name, bytes.as_slice())
        }))
    }
}

/// SHA-256 (hex) over config files' names and contents: what `/readyz` reports as
/// `configHash`, and what the operator computes for the files it renders, so the two can
/// be compared.
pub fn config_hash<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    for (name, bytes) in files {
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hex(&hasher.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn read_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn endpoint_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io_err = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted_extension = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if name.starts_with('.') || !wanted_extension {
            continue;
        }
        // ConfigMap keys are symlinks into `..data/`; follow them.
        let path = entry.path();
        if std::fs::metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, LoadError> {
    // Syntax first, on its own: ignoring every value, only libyaml can fail, and its messages
    // hold no input text. What fails after that is the types' doing, and is rewritten.
    serde_yaml_ng::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| LoadError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_yaml_ng::from_slice(bytes).map_err(|e| LoadError::Parse {
        path: path.to_path_buf(),
        message: yaml_error::describe(&e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_directory_like_a_configmap_mount() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_11_23_20_00_00.000");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(
            data.join("chat.yaml"),
            "{name: chat, provider: mock, model: m}",
        )
        .unwrap();
        std::fs::write(
            data.join("embed.yaml"),
            "{name: embed, provider: mock, model: e}",
        )
        .unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).unwrap();
        for key in ["chat.yaml", "embed.yaml"] {
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.path().join(key)).unwrap();
        }
        let loaded = ConfigSource::Dir(dir.path().to_path_buf()).load().unwrap();
        let names: Vec<_> = loaded
            .config
            .endpoints
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(names, ["chat", "embed"]);
    }

    #[test]
    fn unknown_fields_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "endpoints: [{name: a, provider: mock, model: m, timeout: 5s}]",
        )
        .unwrap();
        let err = ConfigSource::File(path.clone())
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn hash_changes_with_content_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let source = ConfigSource::File(path.clone());
        std::fs::write(&path, "endpoints: [{name: a, provider: mock, model: m}]").unwrap();
        let first = source.load().unwrap().hash;
        assert_eq!(source.load().unwrap().hash, first);
        std::fs::write(&path, "endpoints: [{name: a, provider: mock, model: n}]").unwrap();
        assert_ne!(source.load().unwrap().hash, first);
    }

    #[test]
    fn empty_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ConfigSource::Dir(dir.path().to_path_buf())
            .load()
            .unwrap_err();
        assert!(matches!(err, LoadError::EmptyDir { .. }));
    }

    #[test]
    fn a_directory_expecting_endpoints_may_lack_some_or_all() {
        let dir = tempfile::tempdir().unwrap();
        let source = ConfigSource::ExpectingDir {
            dir: dir.path().to_path_buf(),
            expected: "chat,embed".parse().unwrap(),
        };
        let empty = source.load().unwrap();
        assert!(empty.config.endpoints.is_empty());
        assert_eq!(empty.missing, ["chat", "embed"]);

        std::fs::write(
            dir.path().join("embed.yaml"),
            "{name: embed, provider: mock, model: e}",
        )
        .unwrap();
        let partial = source.load().unwrap();
        assert_eq!(partial.missing, ["chat"]);
        assert_ne!(partial.hash, empty.hash);

        // What is there is still validated as usual.
        std::fs::write(
            dir.path().join("chat.yaml"),
            "{name: chat, provider: mock, model: ''}",
        )
        .unwrap();
        assert!(matches!(source.load(), Err(LoadError::Invalid { .. })));
    }

    #[test]
    fn expecting_anything_reports_nothing_missing() {
        let dir = tempfile::tempdir().unwrap();
        let source = ConfigSource::ExpectingDir {
            dir: dir.path().to_path_buf(),
            expected: ExpectedEndpoints::Any,
        };
        assert!(source.load().unwrap().missing.is_empty());
    }
}

#[cfg(test)]
mod proptests;
