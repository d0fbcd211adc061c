//! Configuration: YAML resources read from a directory, validated into a [`Config`].
//!
//! Loading never stops at the first problem: every error found is reported,
//! each with the file, line and field it is about.

mod build;
mod locate;
mod model;
pub mod raw;
mod rules;
pub mod secret;

use std::fmt;
use std::path::{Path, PathBuf};

pub use locate::LineIndex;
pub use model::*;
pub use rules::{Destination, Facts, Pattern, Rule, UpstreamRoute, any_matches, catches_all, segment_prefix};

/// One problem in the configuration, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File the problem is in.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path of the field, e.g. `spec.services.orders.address`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where resources come from: a directory, or strings in tests.
pub trait Source {
    /// `(file name, contents)` of every resource file, in a stable order.
    fn files(&self) -> Result<Vec<(String, String)>, ConfigError>;
    /// Directory that relative `${file:...}` references resolve against.
    fn base_dir(&self) -> PathBuf;
}

/// Every `*.yaml` / `*.yml` file directly inside a directory.
#[derive(Debug, Clone)]
pub struct DirSource(pub PathBuf);

impl Source for DirSource {
    fn files(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let dir_error = |message: String| ConfigError {
            file: self.0.display().to_string(),
            line: 0,
            column: 0,
            field: String::new(),
            message,
        };
        let entries = std::fs::read_dir(&self.0)
            .map_err(|e| dir_error(format!("cannot read the configuration directory: {e}")))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(dir_error(
                "no *.yaml or *.yml files in the configuration directory".into(),
            ));
        }
        paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).map_err(|e| ConfigError {
                    file: p.display().to_string(),
                    line: 0,
                    column: 0,
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                })?;
                Ok((p.display().to_string(), text))
            })
            .collect()
    }

    fn base_dir(&self) -> PathBuf {
        self.0.clone()
    }
}

/// Resource files held in memory.
#[derive(Debug, Clone, Default)]
pub struct MemSource {
    /// `(file name, contents)`.
    pub files: Vec<(String, String)>,
    /// Base for relative file references.
    pub base: PathBuf,
}

impl Source for MemSource {
    fn files(&self) -> Result<Vec<(String, String)>, ConfigError> {
        Ok(self.files.clone())
    }

    fn base_dir(&self) -> PathBuf {
        self.base.clone()
    }
}

/// Loads and validates every resource from `source`.
pub fn load(source: &dyn Source) -> Result<Config, ConfigErrors> {
    let files = source.files().map_err(|e| ConfigErrors(vec![e]))?;
    build::build(&files, &source.base_dir())
}

/// Loads a configuration directory.
pub fn load_dir(dir: &Path) -> Result<Config, ConfigErrors> {
    load(&DirSource(dir.to_path_buf()))
}
