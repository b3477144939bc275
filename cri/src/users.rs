//! The container's user from the image's `/etc/passwd` and `/etc/group`, as containerd
//! 1.6 resolves it (`oci.WithUser`, `WithAdditionalGIDs`): a user string `user`, `uid`,
//! `user:group`, `uid:gid` (names looked up in the image, numbers taken as they are), the
//! primary gid from the user's passwd entry (0 when a numeric uid has none), and the
//! groups of `/etc/group` that list the user as a member.

/// One `/etc/passwd` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// One `/etc/group` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The image's user databases (empty where the image has no such file).
#[derive(Clone, Debug, Default)]
pub struct UserDb {
    pub passwd: Vec<PasswdEntry>,
    pub group: Vec<GroupEntry>,
}

/// The process user of the OCI spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the primary gid first (as containerd 1.6.18+), then the
    /// image's groups listing the user, then the CRI's supplemental groups.
    pub additional_gids: Vec<u32>,
    /// The user's name when the image knows it.
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    NoSuchUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    NoSuchGroup(String),
    #[error("user {0:?}: expected user, uid, user:group or uid:gid")]
    Malformed(String),
    #[error("{what} {value} is out of range (0..=4294967294)")]
    OutOfRange { what: &'static str, value: i64 },
}

/// Lines of a colon-separated database, comments and malformed lines skipped (as glibc).
fn fields(text: &str, n: usize) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(move |f| f.len() >= n && !f[0].is_empty())
}

impl UserDb {
    pub fn parse(passwd: &str, group: &str) -> UserDb {
        let passwd = fields(passwd, 4)
            .filter_map(|f| {
                Some(PasswdEntry {
                    name: f[0].to_string(),
                    uid: f[2].trim().parse().ok()?,
                    gid: f[3].trim().parse().ok()?,
                })
            })
            .collect();
        let group = fields(group, 3)
            .filter_map(|f| {
                Some(GroupEntry {
                    name: f[0].to_string(),
                    gid: f[2].trim().parse().ok()?,
                    members: f
                        .get(3)
                        .map(|m| {
                            m.split(',')
                                .map(str::trim)
                                .filter(|s| !s.is_empty())
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect();
        UserDb { passwd, group }
    }

    fn by_uid(&self, uid: u32) -> Option<&PasswdEntry> {
        self.passwd.iter().find(|p| p.uid == uid)
    }

    fn by_name(&self, name: &str) -> Option<&PasswdEntry> {
        self.passwd.iter().find(|p| p.name == name)
    }

    /// Resolves a user string (`user[:group]`, names or numbers). `image_groups`: whether
    /// the image's `/etc/group` memberships count (CRI's supplemental groups policy Merge).
    pub fn resolve(
        &self,
        userstr: &str,
        image_groups: bool,
        supplemental: &[u32],
    ) -> Result<ProcessUser, UserError> {
        let (u, g) = match userstr.split(':').collect::<Vec<_>>()[..] {
            [u] => (u, None),
            [u, g] => (u, Some(g)),
            _ => return Err(UserError::Malformed(userstr.into())),
        };
        if u.is_empty() || g.is_some_and(str::is_empty) {
            return Err(UserError::Malformed(userstr.into()));
        }
        let (uid, mut gid, name) = match u.parse::<u32>() {
            Ok(uid) => match self.by_uid(uid) {
                Some(p) => (uid, p.gid, Some(p.name.clone())),
                None => (uid, 0, None),
            },
            Err(_) => {
                let p = self
                    .by_name(u)
                    .ok_or_else(|| UserError::NoSuchUser(u.into()))?;
                (p.uid, p.gid, Some(p.name.clone()))
            }
        };
        if let Some(g) = g {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => self
                    .group
                    .iter()
                    .find(|e| e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| UserError::NoSuchGroup(g.into()))?,
            };
        }
        let mut additional_gids = vec![gid];
        if let (true, Some(n)) = (image_groups, &name) {
            additional_gids.extend(
                self.group
                    .iter()
                    .filter(|e| &e.name != n && e.members.iter().any(|m| m == n))
                    .map(|e| e.gid),
            );
        }
        additional_gids.extend_from_slice(supplemental);
        let mut seen = std::collections::HashSet::new();
        additional_gids.retain(|g| seen.insert(*g));
        Ok(ProcessUser {
            uid,
            gid,
            additional_gids,
            name,
        })
    }
}

/// A CRI id (int64) as a Linux id; -1 (`(uid_t)-1`) and beyond are refused.
pub fn id(what: &'static str, value: i64) -> Result<u32, UserError> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v != u32::MAX)
        .ok_or(UserError::OutOfRange { what, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        user:x:1000:1000::/home/user:/bin/sh\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:user,other\nuser:x:1000:user\naudio:x:29:other\n";

    fn db() -> UserDb {
        UserDb::parse(PASSWD, GROUP)
    }

    #[test]
    fn names_and_numbers_resolve_as_containerd_does() {
        let db = db();
        let u = db.resolve("user", true, &[]).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, [1000, 10]);
        assert_eq!(u.name.as_deref(), Some("user"));
        // A uid with an entry gets its gid and groups; one without gets gid 0.
        let u = db.resolve("1000", true, &[5]).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.additional_gids),
            (1000, 1000, vec![1000, 10, 5])
        );
        let u = db.resolve("4242", true, &[]).unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (4242, 0, vec![0]));
        // user:group in every form.
        assert_eq!(db.resolve("user:wheel", true, &[]).unwrap().gid, 10);
        assert_eq!(db.resolve("user:77", true, &[]).unwrap().gid, 77);
        assert_eq!(db.resolve("7:8", true, &[]).unwrap().gid, 8);
        // Strict: only the primary gid and the CRI's groups.
        assert_eq!(
            db.resolve("user", false, &[3, 1000])
                .unwrap()
                .additional_gids,
            [1000, 3]
        );
    }

    #[test]
    fn unknown_names_and_bad_forms_are_errors() {
        let db = db();
        assert_eq!(
            db.resolve("ghost", true, &[]),
            Err(UserError::NoSuchUser("ghost".into()))
        );
        assert_eq!(
            db.resolve("user:ghosts", true, &[]),
            Err(UserError::NoSuchGroup("ghosts".into()))
        );
        for bad in ["", ":1", "1:", "a:b:c"] {
            assert!(
                matches!(db.resolve(bad, true, &[]), Err(UserError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(id("run_as_user", -1).is_err());
        assert!(id("run_as_user", 1 << 40).is_err());
        assert_eq!(id("run_as_user", 1000), Ok(1000));
    }
}
