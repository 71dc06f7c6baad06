//! Changing the config file in place: adding, replacing and removing a cluster's table while
//! keeping the file's comments and layout (`toml_edit`). A change is validated as a whole,
//! exactly as the daemon will read it, before anything is written, and the file is replaced
//! atomically (same mode, 0600 for a new file): never a partial or invalid config.

use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::config::{Config, ConfigError, HostKeyPolicy, HostPort};

/// Why the config was not changed; the file is as it was.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The file could not be read.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// toml_edit's message, naming the line and column.
        message: String,
    },
    /// `clusters` is something other than a table.
    #[error("{}: `clusters` is not a table of [clusters.NAME] tables", path.display())]
    NotTables {
        /// The config file.
        path: PathBuf,
    },
    /// A cluster of that name exists and replacing it was not asked for.
    #[error("cluster {name:?} is already in {}; pass --replace to overwrite it, or --name to import it under another name", path.display())]
    Exists {
        /// The cluster.
        name: String,
        /// The config file.
        path: PathBuf,
    },
    /// No cluster of that name to remove.
    #[error("no cluster named {name:?} in {}", path.display())]
    NoSuchCluster {
        /// The cluster.
        name: String,
        /// The config file.
        path: PathBuf,
    },
    /// The changed config would not be valid (the daemon would refuse it).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// Writing the new file (or its directory) failed.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A cluster as an import describes it; written as a `[clusters.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCluster {
    /// The cluster's name.
    pub name: String,
    /// The tunnel host.
    pub tunnel: HostPort,
    /// ProxyJump hops (`[user@]host[:port]`).
    pub jump: Vec<String>,
    /// The SSH user.
    pub user: String,
    /// Key files, as the source wrote them (`~` allowed).
    pub identity_files: Vec<String>,
    /// Pin files; empty for the defaults.
    pub known_hosts: Vec<String>,
    /// `accept-new` when the source said so; strict otherwise (never `off` from an import).
    pub host_key_checking: HostKeyPolicy,
    /// The fleet endpoint, when not the default `unix:///var/run/fleet.sock`.
    pub endpoint: Option<String>,
}

impl NewCluster {
    fn table(&self) -> Table {
        let mut t = Table::new();
        let list = |v: &[String]| {
            let mut a = Array::new();
            for s in v {
                a.push(s.as_str());
            }
            value(a)
        };
        t["tunnel"] = value(self.tunnel.to_string());
        if !self.jump.is_empty() {
            t["jump"] = list(&self.jump);
        }
        if let Some(e) = &self.endpoint {
            t["endpoint"] = value(e.as_str());
        }
        t["user"] = value(self.user.as_str());
        if !self.identity_files.is_empty() {
            t["identity_files"] = list(&self.identity_files);
        }
        if !self.known_hosts.is_empty() {
            t["known_hosts"] = list(&self.known_hosts);
        }
        if self.host_key_checking == HostKeyPolicy::AcceptNew {
            t["host_key_checking"] = value("accept-new");
        }
        t
    }
}

/// The file's text (empty when it does not exist yet) as a document.
fn read(path: &Path) -> Result<DocumentMut, EditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(EditError::Read {
                path: path.into(),
                source,
            })
        }
    };
    text.parse::<DocumentMut>().map_err(|e| EditError::Syntax {
        path: path.into(),
        message: e.to_string().trim().to_string(),
    })
}

/// Validates `doc` as the daemon will read it, then replaces `path` with it atomically.
/// Returns the validated config.
fn write(path: &Path, doc: &DocumentMut) -> Result<Config, EditError> {
    let text = doc.to_string();
    let config = Config::parse(path, &text)?;
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EditError::Write { path, source }
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(failed(dir))?;
    }
    let mode = std::fs::metadata(path).map_or(0o600, |m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    let mut tmp = tempfile::Builder::new()
        .prefix(".config.")
        .tempfile_in(dir)
        .map_err(failed(dir))?;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| tmp.write_all(text.as_bytes()))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(failed(path))?;
    tmp.persist(path).map_err(|e| failed(path)(e.error))?;
    Ok(config)
}

/// The document with `cluster` added (or replacing the table of the same name when
/// `replace`), validated but not written.
fn with_cluster(
    path: &Path,
    cluster: &NewCluster,
    replace: bool,
) -> Result<DocumentMut, EditError> {
    let mut doc = read(path)?;
    if !doc.contains_key("clusters") {
        let mut t = Table::new();
        t.set_implicit(true);
        doc.insert("clusters", Item::Table(t));
    }
    let Some(clusters) = doc["clusters"].as_table_mut() else {
        return Err(EditError::NotTables { path: path.into() });
    };
    if clusters.contains_key(&cluster.name) && !replace {
        return Err(EditError::Exists {
            name: cluster.name.clone(),
            path: path.into(),
        });
    }
    clusters.insert(&cluster.name, Item::Table(cluster.table()));
    Config::parse(path, &doc.to_string())?;
    Ok(doc)
}

/// The config `path` would hold with `cluster` added, without writing it (to pin the
/// cluster's host before the cluster exists).
pub fn preview(path: &Path, cluster: &NewCluster, replace: bool) -> Result<Config, EditError> {
    let doc = with_cluster(path, cluster, replace)?;
    Ok(Config::parse(path, &doc.to_string())?)
}

/// Adds `cluster` to the config file (replacing one of the same name only when `replace`).
pub fn add_cluster(path: &Path, cluster: &NewCluster, replace: bool) -> Result<Config, EditError> {
    let doc = with_cluster(path, cluster, replace)?;
    write(path, &doc)
}

/// Removes the cluster called `name` from the config file.
pub fn remove_cluster(path: &Path, name: &str) -> Result<Config, EditError> {
    let mut doc = read(path)?;
    let removed = doc
        .get_mut("clusters")
        .and_then(Item::as_table_mut)
        .and_then(|t| t.remove(name));
    if removed.is_none() {
        return Err(EditError::NoSuchCluster {
            name: name.into(),
            path: path.into(),
        });
    }
    write(path, &doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> NewCluster {
        NewCluster {
            name: "lab".into(),
            tunnel: HostPort::parse("127.0.0.1:2222").unwrap(),
            jump: vec![],
            user: "core".into(),
            identity_files: vec!["~/.vagrant.d/insecure_private_key".into()],
            known_hosts: vec!["/tmp/kh".into()],
            host_key_checking: HostKeyPolicy::Strict,
            endpoint: None,
        }
    }

    #[test]
    fn add_keeps_comments_refuses_duplicates_and_remove_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let original = "# my clusters\n[defaults]\nuser = \"core\" # fleetctl's\n\n[clusters.prod]\ntunnel = \"bastion:22\"\n";
        std::fs::write(&path, original).unwrap();
        let c = add_cluster(&path, &lab(), false).unwrap();
        assert_eq!(c.clusters["lab"].tunnel.to_string(), "127.0.0.1:2222");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(original), "{text}");
        assert!(
            text.contains("[clusters.lab]\ntunnel = \"127.0.0.1:2222\""),
            "{text}"
        );
        let e = add_cluster(&path, &lab(), false).unwrap_err();
        assert!(matches!(e, EditError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("--replace"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let mut other = lab();
        other.user = "root".into();
        add_cluster(&path, &other, true).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("user = \"root\""));
        remove_cluster(&path, "lab").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
        assert!(matches!(
            remove_cluster(&path, "lab"),
            Err(EditError::NoSuchCluster { .. })
        ));
    }

    #[test]
    fn an_invalid_result_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[defaults]\nbogus = 1\n").unwrap();
        let e = add_cluster(&path, &lab(), false).unwrap_err();
        assert!(matches!(e, EditError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[defaults]\nbogus = 1\n"
        );
        // A new file is created 0600.
        let fresh = dir.path().join("sub/new.toml");
        add_cluster(&fresh, &lab(), false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
