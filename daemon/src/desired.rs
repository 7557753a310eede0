//! Standalone mode's desired state, from two directories (as systemd units and
//! kubelet's static pods split them):
//!
//! - `departments_dir` (`/etc/fleet-agent/departments.d`): hand-written specs,
//!   one per `*.toml`, owned by the operator. The daemon only reads it (under
//!   the unit, /etc is read-only to it); an edit takes effect on `systemctl
//!   reload` or restart.
//! - `Config::applied_dir()` (`/var/lib/fleet-agent/applied.d`): the specs
//!   `agentctl apply` sent, one `<id>.toml` each (0600: they hold secrets),
//!   written and removed by the daemon only.
//!
//! Both are read at start and on SIGHUP and applied together with pruning, so
//! the two directories are the whole truth and survive a lost state database.
//! An id in both, or in two hand-written files, is refused whole naming both
//! files, and so is a directory with any bad file: the departments then keep
//! their last applied specs (from the store).

use fleet_model::spec::FieldError;
use fleet_model::{Config, DepartmentSpec};
use std::collections::BTreeMap;
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

/// Where a spec of the standalone desired state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A file of `departments_dir`, edited by the operator.
    HandWritten,
    /// `agentctl apply`'s file under the state directory.
    Applied,
}

/// The two directories of the standalone desired state.
#[derive(Debug, Clone)]
pub struct Sources {
    pub hand_written: PathBuf,
    pub applied: PathBuf,
}

impl Sources {
    pub fn of(config: &Config) -> Self {
        Self {
            hand_written: config.departments_dir.clone(),
            applied: config.applied_dir(),
        }
    }
}

/// The desired state as loaded: every spec with the file that defines it.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub specs: Vec<DepartmentSpec>,
    pub files: BTreeMap<String, (Origin, PathBuf)>,
}

/// Loads both directories; any bad file, or an id defined twice, refuses the
/// whole set with every problem named (file, line:column, field).
pub fn load(sources: &Sources) -> Result<Desired, DesiredError> {
    let mut problems = Vec::new();
    let mut desired = Desired::default();
    for (origin, dir) in [
        (Origin::HandWritten, &sources.hand_written),
        (Origin::Applied, &sources.applied),
    ] {
        for (path, parsed) in read_dir_specs(dir)? {
            let spec = match parsed {
                Ok(spec) => spec,
                Err(mut fields) => {
                    problems.append(&mut fields);
                    continue;
                }
            };
            if origin == Origin::Applied && path.file_stem() != Some(spec.id.as_ref()) {
                problems.push(FieldError::new(
                    format!("{}: id", path.display()),
                    format!(
                        "`{}` does not match the file name; files here are written by `agentctl apply` as <id>.toml: remove this one and apply the spec again",
                        spec.id
                    ),
                ));
                continue;
            }
            if let Some((_, other)) = desired.files.get(&spec.id) {
                problems.push(FieldError::new(
                    format!("{}: id", path.display()),
                    format!(
                        "`{}` is also defined by {}; a department is defined in one file only: remove one of them, then `systemctl reload fleet-agentd`",
                        spec.id,
                        other.display()
                    ),
                ));
                continue;
            }
            desired
                .files
                .insert(spec.id.clone(), (origin, path.clone()));
            desired.specs.push(spec);
        }
    }
    if problems.is_empty() {
        Ok(desired)
    } else {
        Err(DesiredError::Invalid(problems))
    }
}

/// The hand-written file defining `id`, if any, as the directory is now (not
/// as it was last loaded: a file added since must not be shadowed by an apply).
/// Lenient on purpose: a file that does not parse is matched by its name only.
pub fn hand_written_file(dir: &Path, id: &str) -> Result<Option<PathBuf>, DesiredError> {
    for path in toml_files(dir)? {
        if path.file_stem() == Some(id.as_ref()) {
            return Ok(Some(path));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DesiredError::Io {
            path: path.clone(),
            source,
        })?;
        let named: Option<String> = toml::from_str::<toml::Table>(&text)
            .ok()
            .and_then(|t| t.get("id").and_then(|v| v.as_str()).map(str::to_string));
        if named.as_deref() == Some(id) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Every `*.toml` in `dir`, sorted by name; a missing directory is empty.
fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, DesiredError> {
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
    Ok(paths)
}

type Parsed = Result<DepartmentSpec, Vec<FieldError>>;

fn read_dir_specs(dir: &Path) -> Result<Vec<(PathBuf, Parsed)>, DesiredError> {
    let mut out = Vec::new();
    for path in toml_files(dir)? {
        let parsed = match std::fs::read_to_string(&path) {
            Ok(text) => parse_file(&path, &text),
            // One unreadable file is one bad file: named with the others.
            Err(e) => Err(vec![FieldError::new(
                path.display().to_string(),
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!(
                        "cannot read it ({e}); the daemon runs as fleet-agent: `chgrp fleet-agent {0} && chmod 0640 {0}`",
                        path.display()
                    )
                } else {
                    format!("cannot read it: {e}")
                },
            )]),
        };
        out.push((path, parsed));
    }
    Ok(out)
}

/// One spec file; each problem's field is prefixed with `file:line:column` of
/// the key at fault (or of the parse error), so an operator can go straight there.
pub fn parse_file(path: &Path, text: &str) -> Parsed {
    let name = path.display().to_string();
    DepartmentSpec::from_toml(&name, text).map_err(|e| e.in_file(&name, text))
}

/// Writes `spec` as `<dir>/<id>.toml` (mode 0600: it holds secrets) atomically.
/// The id must be valid (`DepartmentSpec::validate`): it names the file.
pub fn write_spec(dir: &Path, spec: &DepartmentSpec) -> Result<(), DesiredError> {
    let text = toml::to_string(spec)
        .map_err(|e| DesiredError::Invalid(vec![FieldError::new("spec", e.to_string())]))?;
    let mut content = b"# Written by `agentctl apply`; change it with `agentctl apply`, remove it with `agentctl delete`.\n".to_vec();
    content.extend_from_slice(text.as_bytes());
    write_file(dir, &spec.id, &content)
}

/// Temp file (0600), fsync, rename, fsync of the directory.
fn write_file(dir: &Path, id: &str, content: &[u8]) -> Result<(), DesiredError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |source| DesiredError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
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
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The spec files of some departments as they are now, to put back if the
/// change that is about to replace them is refused.
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

    /// Whether `id` had a file when the snapshot was taken.
    pub fn had(&self, id: &str) -> bool {
        self.files.iter().any(|(i, c)| i == id && c.is_some())
    }
}

pub fn remove_spec(dir: &Path, id: &str) -> Result<(), DesiredError> {
    match std::fs::remove_file(dir.join(format!("{id}.toml"))) {
        Ok(()) => {
            sync_dir(dir);
            Ok(())
        }
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

    fn sources(root: &Path) -> Sources {
        Sources {
            hand_written: root.join("departments.d"),
            applied: root.join("applied.d"),
        }
    }

    #[test]
    fn written_specs_load_back_with_their_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources(dir.path());
        let spec = DepartmentSpec::from_toml(
            "t",
            "id = \"hr\"\nimage = \"a:1\"\n[secrets]\nDB_PASSWORD = \"s3cret\"\n[health]\ninterval = \"2s\"\n",
        )
        .unwrap();
        write_spec(&src.applied, &spec).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(src.applied.join("hr.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = load(&src).unwrap();
        assert_eq!(loaded.specs, vec![spec]);
        assert_eq!(loaded.files["hr"].0, Origin::Applied);
        remove_spec(&src.applied, "hr").unwrap();
        assert!(load(&src).unwrap().specs.is_empty());
    }

    #[test]
    fn one_bad_file_refuses_the_whole_set_naming_file_line_column_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources(dir.path());
        std::fs::create_dir_all(&src.hand_written).unwrap();
        std::fs::write(
            src.hand_written.join("a.toml"),
            "id = \"ok\"\nimage = \"a\"\n",
        )
        .unwrap();
        std::fs::write(
            src.hand_written.join("b.toml"),
            "image = \"a\"\nid = \"../x\"\n",
        )
        .unwrap();
        std::fs::write(
            src.hand_written.join("c.toml"),
            "id = \"cc\"\nimage = \"a\"\n[resources]\nmemroy = \"1GiB\"\n",
        )
        .unwrap();
        let err = load(&src).unwrap_err().to_string();
        assert!(err.contains("b.toml:2:1: id: `../x`"), "{err}");
        assert!(
            err.contains("c.toml:4:1: resources.memroy: unknown field"),
            "{err}"
        );
        assert!(!err.contains("a.toml"), "{err}");
    }

    #[test]
    fn an_id_in_both_directories_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let src = sources(dir.path());
        std::fs::create_dir_all(&src.hand_written).unwrap();
        std::fs::write(
            src.hand_written.join("payroll.toml"),
            "id = \"hr\"\nimage = \"a\"\n",
        )
        .unwrap();
        let spec = DepartmentSpec::from_toml("t", "id = \"hr\"\nimage = \"b\"\n").unwrap();
        write_spec(&src.applied, &spec).unwrap();
        let err = load(&src).unwrap_err().to_string();
        assert!(
            err.contains("applied.d/hr.toml: id")
                && err.contains("also defined by")
                && err.contains("departments.d/payroll.toml"),
            "{err}"
        );
        // The id is found by content too, not only by file name.
        assert_eq!(
            hand_written_file(&src.hand_written, "hr").unwrap(),
            Some(src.hand_written.join("payroll.toml"))
        );
        assert_eq!(hand_written_file(&src.hand_written, "it").unwrap(), None);
    }

    #[test]
    fn a_snapshot_puts_back_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DepartmentSpec::from_toml("t", "id = \"hr\"\nimage = \"a\"\n").unwrap();
        write_spec(dir.path(), &spec).unwrap();
        let before = std::fs::read(dir.path().join("hr.toml")).unwrap();
        let snap = snapshot(dir.path(), ["hr", "it"]);
        assert!(snap.had("hr") && !snap.had("it"));
        remove_spec(dir.path(), "hr").unwrap();
        let other = DepartmentSpec::from_toml("t", "id = \"it\"\nimage = \"a\"\n").unwrap();
        write_spec(dir.path(), &other).unwrap();
        snap.restore().unwrap();
        assert_eq!(std::fs::read(dir.path().join("hr.toml")).unwrap(), before);
        assert!(!dir.path().join("it.toml").exists());
    }
}
