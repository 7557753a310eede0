//! `check-config`'s look at the files the WAL service reads (issue 13):
//! `wal.s3.ca_file` must open and hold a PEM certificate, the same read the
//! WAL service makes at its start, so a wrong path is refused before the
//! service is (re)started instead of at its first upload. When the WAL service
//! runs on its own (`wal.socket`: fleet-agent-wal.service, as
//! `wal.postgres_user`), check-config runs as someone else (root, or
//! fleet-agent under fleet-agentd's unit), so its own read proves nothing
//! about the service's: the permissions along the path, judged for that user
//! and its groups as the kernel would (the mode bits, or a step's POSIX
//! access ACL where it has one: an ACL can grant postgres a CA kept in a
//! directory its mode bits close), decide.

use fleet_model::config::WalConfig;
use fleet_wal::target::TargetError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Who reads the file: a uid and every group it is in.
#[derive(Debug, Clone)]
pub struct Reader {
    pub name: String,
    pub uid: u32,
    pub gids: Vec<u32>,
}

/// One step of opening a file: a directory to search, or the file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub dir: bool,
    /// Its POSIX access ACL's entries, if it has one beyond the mode bits.
    pub acl: Option<Vec<AclEntry>>,
}

/// One entry of a POSIX access ACL (`acl(5)`), as Linux stores it in the
/// `system.posix_acl_access` extended attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub tag: AclTag,
    /// The uid or gid of a named entry (`User`, `Group`); unused otherwise.
    pub id: u32,
    /// `rwx` as the mode's three bits.
    pub perm: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclTag {
    UserObj,
    User,
    GroupObj,
    Group,
    Mask,
    Other,
}

/// The extended attribute's layout (`linux/posix_acl_xattr.h`): a
/// little-endian version 2 header, then 8-byte entries of tag (u16), perm
/// (u16), id (u32). None: not an ACL this code understands, which the caller
/// then judges by the mode bits alone.
pub fn parse_acl(bytes: &[u8]) -> Option<Vec<AclEntry>> {
    let (header, entries) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    entries
        .chunks_exact(8)
        .map(|e| {
            let tag = match u16::from_le_bytes([e[0], e[1]]) {
                0x01 => AclTag::UserObj,
                0x02 => AclTag::User,
                0x04 => AclTag::GroupObj,
                0x08 => AclTag::Group,
                0x10 => AclTag::Mask,
                0x20 => AclTag::Other,
                _ => return None,
            };
            Some(AclEntry {
                tag,
                perm: u32::from(u16::from_le_bytes([e[2], e[3]])) & 0o7,
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
        })
        .collect()
}

/// Whether the kernel grants `reader` the `needed` bit on `step` (its
/// `posix_acl_permission` for a step with an ACL): the owner's entry; else a
/// named user's, limited by the mask; else, if the reader is in the owning or
/// a named group, whether any such entry grants it (masked); else the others'.
fn permits(reader: &Reader, step: &Step, needed: u32) -> bool {
    let grants = |perm: u32| perm & needed == needed;
    let Some(acl) = step.acl.as_ref() else {
        return grants(if step.uid == reader.uid {
            step.mode >> 6
        } else if reader.gids.contains(&step.gid) {
            step.mode >> 3
        } else {
            step.mode
        });
    };
    let entry = |tag: AclTag| acl.iter().find(|e| e.tag == tag).map_or(0, |e| e.perm);
    let mask = acl
        .iter()
        .find(|e| e.tag == AclTag::Mask)
        .map_or(0o7, |e| e.perm);
    if step.uid == reader.uid {
        return grants(entry(AclTag::UserObj));
    }
    if let Some(named) = acl
        .iter()
        .find(|e| e.tag == AclTag::User && e.id == reader.uid)
    {
        return grants(named.perm & mask);
    }
    let mut groups = acl
        .iter()
        .filter(|e| match e.tag {
            AclTag::GroupObj => reader.gids.contains(&step.gid),
            AclTag::Group => reader.gids.contains(&e.id),
            _ => false,
        })
        .peekable();
    if groups.peek().is_some() {
        return groups.any(|e| grants(e.perm & mask));
    }
    grants(entry(AclTag::Other))
}

/// The first step the kernel would refuse `reader`: by the mode bits, the
/// owner's bits if it owns the step, else the group's if it is in the group,
/// else the others' (only one class applies: an owner without `r` is refused
/// even when the others have it); by a step's ACL where it has one. None: it
/// can read the file.
pub fn first_refusal<'a>(reader: &Reader, steps: &'a [Step]) -> Option<&'a Step> {
    if reader.uid == 0 {
        return None;
    }
    steps
        .iter()
        .find(|step| !permits(reader, step, if step.dir { 0o1 } else { 0o4 }))
}

/// The problems of `[wal]`'s files for check-config, each naming the field
/// and the file.
pub fn check(wal: &WalConfig) -> Vec<String> {
    // The WAL service reads [wal.s3] only for an s3:// target.
    let Some(path) = wal
        .s3
        .as_ref()
        .and_then(|s3| s3.ca_file.as_deref())
        .filter(|_| wal.target.starts_with("s3://"))
    else {
        return Vec::new();
    };
    if let Err(e) = fleet_wal::target::check_ca_file(path) {
        return vec![match e {
            // Already "wal.s3.ca_file <path>: <cause>"; not a bad target.
            TargetError::Config(message) => message,
            other => other.to_string(),
        }];
    }
    if wal.socket.is_none() {
        // fleet-agentd runs the WAL service itself: the read above was its own.
        return Vec::new();
    }
    // No such user on this host: the unit cannot start as it either, and says so.
    let Some(reader) = reader(&wal.postgres_user) else {
        return Vec::new();
    };
    // This process could read the file, so the steps to it can be looked at.
    let Ok(steps) = steps_to(path) else {
        return Vec::new();
    };
    first_refusal(&reader, &steps)
        .map(|step| {
            format!(
                "wal.s3.ca_file {}: the WAL service's user {} cannot {} {} (mode {:04o}{}, {}:{}); \
                 keep the CA where docs/wal.md puts it, e.g. /etc/ssl/fleet-agent/s3-ca.pem, mode 0644",
                path.display(),
                reader.name,
                if step.dir { "search" } else { "read" },
                if step.path == path { "it".to_string() } else { step.path.display().to_string() },
                step.mode & 0o7777,
                if step.acl.is_some() { " and an ACL" } else { "" },
                user_name(step.uid),
                group_name(step.gid),
            )
        })
        .into_iter()
        .collect()
}

fn reader(name: &str) -> Option<Reader> {
    let user = nix::unistd::User::from_name(name).ok().flatten()?;
    let c_name = std::ffi::CString::new(name).ok()?;
    let gids = nix::unistd::getgrouplist(&c_name, user.gid)
        .map(|gids| gids.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![user.gid.as_raw()]);
    Some(Reader {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gids,
    })
}

/// Every directory searched on the way to `path` (as written, and to where its
/// symlinks lead), then the file it resolves to.
fn steps_to(path: &Path) -> std::io::Result<Vec<Step>> {
    let real = std::fs::canonicalize(path)?;
    let mut steps = Vec::new();
    let mut push = |p: &Path, dir: bool| -> std::io::Result<()> {
        let meta = std::fs::metadata(p)?;
        steps.push(Step {
            path: p.to_path_buf(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            dir,
            // A file system without ACLs, or a step without one: the mode bits.
            acl: xattr::get(p, "system.posix_acl_access")
                .ok()
                .flatten()
                .and_then(|bytes| parse_acl(&bytes)),
        });
        Ok(())
    };
    for chain in [path, real.as_path()] {
        let mut dirs: Vec<&Path> = chain.ancestors().skip(1).collect();
        dirs.reverse();
        for dir in dirs.into_iter().filter(|d| !d.as_os_str().is_empty()) {
            push(dir, true)?;
        }
    }
    push(&real, false)?;
    Ok(steps)
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

#[cfg(test)]
mod tests {
    use super::{check, first_refusal, parse_acl, AclEntry, AclTag, Reader, Step};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn step(path: &str, mode: u32, uid: u32, gid: u32, dir: bool) -> Step {
        Step {
            path: PathBuf::from(path),
            mode,
            uid,
            gid,
            dir,
            acl: None,
        }
    }

    /// `nobody` stands for postgres in these tests, so they cannot run as it.
    fn running_as_nobody() -> bool {
        nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .map(|u| u.uid)
            == Some(nix::unistd::getuid())
    }

    /// The attribute's bytes for `entries` (what `setfacl` writes).
    fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut bytes = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            bytes.extend(tag.to_le_bytes());
            bytes.extend(perm.to_le_bytes());
            bytes.extend(id.to_le_bytes());
        }
        bytes
    }

    const UNDEFINED_ID: u32 = u32::MAX;

    #[test]
    fn an_acl_is_read_from_its_attribute_and_anything_else_is_not_an_acl() {
        let bytes = acl_bytes(&[
            (0x01, 7, UNDEFINED_ID),
            (0x02, 5, 110),
            (0x04, 5, UNDEFINED_ID),
            (0x10, 5, UNDEFINED_ID),
            (0x20, 0, UNDEFINED_ID),
        ]);
        let acl = parse_acl(&bytes).expect("an ACL");
        assert_eq!(
            acl[1],
            AclEntry {
                tag: AclTag::User,
                id: 110,
                perm: 0o5
            }
        );
        assert_eq!(acl.len(), 5);
        assert_eq!(parse_acl(&bytes[..bytes.len() - 1]), None, "a cut entry");
        assert_eq!(parse_acl(&[1, 0, 0, 0]), None, "another version");
        assert_eq!(
            parse_acl(&acl_bytes(&[(0x40, 7, 0)])),
            None,
            "an unknown tag"
        );
        assert_eq!(parse_acl(&[]), None);
    }

    #[test]
    fn an_acl_decides_as_the_kernel_does_named_user_and_groups_under_the_mask() {
        let postgres = Reader {
            name: "postgres".into(),
            uid: 110,
            gids: vec![118, 111],
        };
        // /etc/fleet-agent 0750 root:fleet-agent, then `setfacl -m u:postgres:x`:
        // the group bits shown are the mask (r-x).
        let with = |entries: &[(u16, u16, u32)], mode: u32| Step {
            acl: parse_acl(&acl_bytes(entries)),
            ..step("/etc/fleet-agent", mode, 0, 999, true)
        };
        let named_user = with(
            &[
                (0x01, 7, UNDEFINED_ID),
                (0x02, 1, 110),
                (0x04, 5, UNDEFINED_ID),
                (0x10, 5, UNDEFINED_ID),
                (0x20, 0, UNDEFINED_ID),
            ],
            0o750,
        );
        assert_eq!(
            first_refusal(&postgres, std::slice::from_ref(&named_user)),
            None
        );
        // The same entry under a mask without x (`chmod g-x` after setfacl).
        let masked = with(
            &[
                (0x01, 7, UNDEFINED_ID),
                (0x02, 1, 110),
                (0x04, 4, UNDEFINED_ID),
                (0x10, 4, UNDEFINED_ID),
                (0x20, 0, UNDEFINED_ID),
            ],
            0o740,
        );
        assert!(first_refusal(&postgres, std::slice::from_ref(&masked)).is_some());
        // A named group postgres is in (ssl-cert, 111) grants; one it is not in does not.
        let group_entry = |gid: u32| {
            with(
                &[
                    (0x01, 7, UNDEFINED_ID),
                    (0x04, 0, UNDEFINED_ID),
                    (0x08, 1, gid),
                    (0x10, 1, UNDEFINED_ID),
                    (0x20, 0, UNDEFINED_ID),
                ],
                0o710,
            )
        };
        assert_eq!(first_refusal(&postgres, &[group_entry(111)]), None);
        assert!(first_refusal(&postgres, &[group_entry(112)]).is_some());
        // In a group entry that does not grant: refused, the others' x notwithstanding.
        let others_only = with(
            &[
                (0x01, 7, UNDEFINED_ID),
                (0x04, 0, UNDEFINED_ID),
                (0x08, 0, 111),
                (0x10, 7, UNDEFINED_ID),
                (0x20, 1, UNDEFINED_ID),
            ],
            0o771,
        );
        assert!(first_refusal(&postgres, std::slice::from_ref(&others_only)).is_some());
        // Not in any group entry: the others' entry.
        let stranger = Reader {
            name: "nobody".into(),
            uid: 65534,
            gids: vec![65534],
        };
        assert_eq!(first_refusal(&stranger, &[others_only]), None);
        // The owner: its own entry alone.
        let owner = Reader {
            name: "root-owned".into(),
            uid: 7,
            gids: vec![7],
        };
        let owned = Step {
            uid: 7,
            ..with(
                &[
                    (0x01, 6, UNDEFINED_ID),
                    (0x04, 7, UNDEFINED_ID),
                    (0x10, 7, UNDEFINED_ID),
                    (0x20, 7, UNDEFINED_ID),
                ],
                0o677,
            )
        };
        assert!(first_refusal(&owner, &[owned]).is_some());
    }

    #[test]
    fn the_mode_bits_of_each_step_decide_for_the_readers_class() {
        // postgres: uid 110, groups postgres (118) and ssl-cert (111).
        let postgres = Reader {
            name: "postgres".into(),
            uid: 110,
            gids: vec![118, 111],
        };
        let docs_place = [
            step("/", 0o755, 0, 0, true),
            step("/etc", 0o755, 0, 0, true),
            step("/etc/ssl/fleet-agent", 0o755, 0, 0, true),
            step("/etc/ssl/fleet-agent/s3-ca.pem", 0o644, 0, 0, false),
        ];
        assert_eq!(first_refusal(&postgres, &docs_place), None);
        // docs/wal.md's warning: /etc/fleet-agent is 0750 root:fleet-agent.
        let config_dir = [
            step("/", 0o755, 0, 0, true),
            step("/etc", 0o755, 0, 0, true),
            step("/etc/fleet-agent", 0o750, 0, 999, true),
            step("/etc/fleet-agent/s3-ca.pem", 0o644, 0, 0, false),
        ];
        assert_eq!(
            first_refusal(&postgres, &config_dir).map(|s| s.path.clone()),
            Some(PathBuf::from("/etc/fleet-agent"))
        );
        // A group the reader is in counts (ssl-cert), one it is not in does not.
        let by_group = step("/etc/ssl/private/ca.pem", 0o640, 0, 111, false);
        assert_eq!(
            first_refusal(&postgres, std::slice::from_ref(&by_group)),
            None
        );
        let other_group = step("/etc/ssl/private/ca.pem", 0o640, 0, 112, false);
        assert!(first_refusal(&postgres, std::slice::from_ref(&other_group)).is_some());
        // Only one class applies: an owner without r is refused though others have it.
        let owner_without_r = step("/srv/ca.pem", 0o244, 110, 118, false);
        assert!(first_refusal(&postgres, std::slice::from_ref(&owner_without_r)).is_some());
        // A directory needs x (search), not r.
        let search_only = step("/srv", 0o711, 0, 0, true);
        assert_eq!(
            first_refusal(&postgres, std::slice::from_ref(&search_only)),
            None
        );
        let root = Reader {
            name: "root".into(),
            uid: 0,
            gids: vec![0],
        };
        assert_eq!(first_refusal(&root, &config_dir), None);
    }

    fn wal(ca_file: &std::path::Path, extra: &str) -> fleet_model::config::WalConfig {
        toml::from_str(&format!(
            "target = \"s3://bucket/p\"\n{extra}\n[s3]\nendpoint = \"https://127.0.0.1:1\"\nca_file = \"{}\"\n",
            ca_file.display()
        ))
        .unwrap()
    }

    #[test]
    fn check_config_refuses_a_missing_or_certificate_less_ca_file_naming_field_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, include_bytes!("../../wal/testdata/test-ca.pem")).unwrap();
        assert_eq!(check(&wal(&good, "")), Vec::<String>::new());

        let missing = dir.path().join("missing.pem");
        let problems = check(&wal(&missing, ""));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "wal.s3.ca_file {}: cannot read: ",
                missing.display()
            )),
            "{problems:?}"
        );
        assert!(problems[0].contains("No such file"), "{problems:?}");

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "access_key_id = not a certificate\n").unwrap();
        let problems = check(&wal(&junk, ""));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("wal.s3.ca_file {}: ", junk.display())),
            "{problems:?}"
        );
        assert!(problems[0].contains("certificate"), "{problems:?}");

        // The WAL service reads [wal.s3] only for an s3:// target.
        let file_target: fleet_model::config::WalConfig = toml::from_str(&format!(
            "target = \"file:///var/backups/fleet-agent\"\n[s3]\nca_file = \"{}\"\n",
            missing.display()
        ))
        .unwrap();
        assert_eq!(check(&file_target), Vec::<String>::new());
    }

    #[test]
    fn with_a_separate_wal_service_its_user_must_be_able_to_reach_and_read_the_ca_file() {
        // `nobody` stands for postgres: a user other than this test's, which
        // can read its own files (as root, check-config can read anything).
        if running_as_nobody() {
            eprintln!("skipped: running as nobody");
            return;
        }
        // Under /tmp (1777): every directory above the test's own is searchable.
        let dir = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, include_bytes!("../../wal/testdata/test-ca.pem")).unwrap();
        let separate = "socket = \"/run/fleet-agent-wal/wal.sock\"\npostgres_user = \"nobody\"";
        let set_mode = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set_mode(dir.path(), 0o700);
        set_mode(&ca, 0o644);
        let problems = check(&wal(&ca, separate));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "wal.s3.ca_file {}: the WAL service's user nobody cannot search {} (mode 0700,",
                ca.display(),
                dir.path().display()
            )),
            "{problems:?}"
        );
        set_mode(dir.path(), 0o755);
        set_mode(&ca, 0o600);
        let problems = check(&wal(&ca, separate));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("user nobody cannot read it (mode 0600,"),
            "{problems:?}"
        );
        set_mode(&ca, 0o644);
        assert_eq!(check(&wal(&ca, separate)), Vec::<String>::new());
        // fleet-agentd runs the WAL service itself: its own read is the one.
        set_mode(&ca, 0o600);
        assert_eq!(
            check(&wal(&ca, "postgres_user = \"nobody\"")),
            Vec::<String>::new()
        );
    }
    #[test]
    fn an_acl_on_a_real_directory_lets_the_wal_services_user_reach_the_ca_file() {
        if running_as_nobody() {
            eprintln!("skipped: running as nobody");
            return;
        }
        let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
            eprintln!("skipped: no user nobody");
            return;
        };
        let dir = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, include_bytes!("../../wal/testdata/test-ca.pem")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
        let separate = "socket = \"/run/fleet-agent-wal/wal.sock\"\npostgres_user = \"nobody\"";
        assert_eq!(check(&wal(&ca, separate)).len(), 1, "0700 without an ACL");
        // `setfacl -m u:nobody:x DIR`, written as setfacl writes it.
        let acl = acl_bytes(&[
            (0x01, 7, UNDEFINED_ID),
            (0x02, 1, nobody.uid.as_raw()),
            (0x04, 0, UNDEFINED_ID),
            (0x10, 1, UNDEFINED_ID),
            (0x20, 0, UNDEFINED_ID),
        ]);
        if let Err(e) = xattr::set(dir.path(), "system.posix_acl_access", &acl) {
            eprintln!("skipped: this file system takes no POSIX ACL ({e})");
            return;
        }
        assert_eq!(check(&wal(&ca, separate)), Vec::<String>::new());
        // The mask then closes it again (`chmod 0700` after setfacl).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let problems = check(&wal(&ca, separate));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("(mode 0700 and an ACL,"),
            "{problems:?}"
        );
    }
}
