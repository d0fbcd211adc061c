//! The configuration source (a directory today): its files, and the
//! generation they make.

use std::path::Path;

use crate::config::{self, ConfigErrors, Source as _};
use crate::runtime::Generation;

/// `(file name, contents)` of every resource file read from the source.
pub type Files = Vec<(String, String)>;

/// Resource files of `dir`; the outer error means the source itself cannot be
/// read (unreachable), the inner one that what it holds is not usable.
pub(super) fn read(dir: &Path) -> Result<Result<Files, ConfigErrors>, std::io::Error> {
    std::fs::read_dir(dir)?;
    Ok(config::DirSource(dir.to_path_buf())
        .files()
        .map_err(|e| ConfigErrors(vec![e])))
}

/// The configuration `files` of `dir` make, its warnings logged.
pub(super) fn parse(dir: &Path, files: Files) -> Result<config::Config, ConfigErrors> {
    let config = config::load(&config::MemSource {
        files,
        base: dir.to_path_buf(),
    })?;
    for w in &config.warnings {
        tracing::warn!(warning = %w, "configuration");
    }
    Ok(config)
}

/// The generation `files` make, carrying services over from `previous`.
pub(super) fn load(
    dir: &Path,
    files: Files,
    previous: Option<&Generation>,
) -> Result<Generation, ConfigErrors> {
    Generation::build(parse(dir, files)?, previous)
}

/// The source's files and the configuration they make; `Ok(None)` when the
/// source cannot be read (logged: what is applied stays in force).
pub(super) fn read_config(dir: &Path) -> Result<Option<(Files, config::Config)>, ConfigErrors> {
    let files = match read(dir) {
        Ok(files) => files?,
        Err(e) => {
            tracing::warn!(config = %dir.display(), error = %e, "configuration source unreachable; what is applied stays in force");
            return Ok(None);
        }
    };
    let config = parse(dir, files.clone())?;
    Ok(Some((files, config)))
}
