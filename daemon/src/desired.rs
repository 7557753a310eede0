//! Standalone mode's desired state: one TOML spec per file in `departments_dir`.
//! `agentctl apply` writes files here and `agentctl delete` removes them, so the
//! directory is the whole truth and survives a lost state database. A directory
//! with any bad file is refused whole.

use fleet_model::spec::FieldError;
use fleet_model::DepartmentSpec;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", fleet_model::spec::join_fields(.0))]
    Invalid(Vec<FieldError>),
}

/// Every `*.toml` in `dir`, sorted by name; a missing directory is empty.
pub fn load_dir(dir: &Path) -> Result<Vec<DepartmentSpec>, DesiredError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => {
            return Err(DesiredError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| DesiredError::Io {
            path: path.clone(),
            source,
        })?;
        let name = path.display().to_string();
        match DepartmentSpec::from_toml(&name, &text) {
            Ok(spec) => specs.push(spec),
            Err(e) => problems.extend(
                e.fields()
                    .into_iter()
                    .map(|f| FieldError::new(format!("{name}: {}", f.field), f.message)),
            ),
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(DesiredError::Invalid(problems))
    }
}

/// Writes `spec` as `<dir>/<id>.toml` (mode 0600: it holds secrets) atomically.
/// The id must be valid (`DepartmentSpec::validate`): it names the file.
pub fn write_spec(dir: &Path, spec: &DepartmentSpec) -> Result<(), DesiredError> {
    let text = toml::to_string(spec)
        .map_err(|e| DesiredError::Invalid(vec![FieldError::new("spec", e.to_string())]))?;
    let mut content =
        b"# Written by agentctl apply; edit and run `systemctl reload fleet-agentd`.\n".to_vec();
    content.extend_from_slice(text.as_bytes());
    write_file(dir, &spec.id, &content)
}

/// Temp file (0600), fsync, rename, fsync of the directory.
fn write_file(dir: &Path, id: &str, content: &[u8]) -> Result<(), DesiredError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| DesiredError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let final_path = dir.join(format!("{id}.toml"));
    let temp = dir.join(format!(".{id}.toml.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    file.write_all(content).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temp, &final_path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The spec files of some departments as they are now, to put back if the
/// apply that is about to replace them is refused.
pub struct Snapshot {
    dir: PathBuf,
    files: Vec<(String, Option<Vec<u8>>)>,
}

/// `ids` must be valid department ids: they name files.
pub fn snapshot<'a>(dir: &Path, ids: impl IntoIterator<Item = &'a str>) -> Snapshot {
    Snapshot {
        dir: dir.to_path_buf(),
        files: ids
            .into_iter()
            .map(|id| {
                (
                    id.to_string(),
                    std::fs::read(dir.join(format!("{id}.toml"))).ok(),
                )
            })
            .collect(),
    }
}

impl Snapshot {
    pub fn restore(&self) -> Result<(), DesiredError> {
        for (id, content) in &self.files {
            match content {
                Some(content) => write_file(&self.dir, id, content)?,
                None => remove_spec(&self.dir, id)?,
            }
        }
        Ok(())
    }
}

pub fn remove_spec(dir: &Path, id: &str) -> Result<(), DesiredError> {
    match std::fs::remove_file(dir.join(format!("{id}.toml"))) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DesiredError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_specs_load_back_with_their_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DepartmentSpec::from_toml(
            "t",
            "id = \"hr\"\nimage = \"a:1\"\n[secrets]\nDB_PASSWORD = \"s3cret\"\n[health]\ninterval = \"2s\"\n",
        )
        .unwrap();
        write_spec(dir.path(), &spec).unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        assert_eq!(loaded, vec![spec]);
        remove_spec(dir.path(), "hr").unwrap();
        assert!(load_dir(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn one_bad_file_refuses_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "id = \"ok\"\nimage = \"a\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "id = \"../x\"\nimage = \"a\"\n").unwrap();
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("b.toml: id"), "{err}");
    }
}
