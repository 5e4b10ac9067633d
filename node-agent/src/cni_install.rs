//! `wgmesh-agent install-cni`: copies the CNI plugins the agent's conflist uses from the
//! image onto the node (the DaemonSet's init container runs it, with the node's
//! `/opt/cni/bin` mounted). It owns exactly the named plugin files: each is replaced
//! atomically (a temporary file beside it, then a rename) so a runtime executing a plugin
//! never sees half a binary, and an identical file is left alone. It never lists, changes or
//! removes anything else in the directory, and never touches CNI configurations.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The reference plugins the conflist written by the agent calls (see `agent::cni`).
pub const PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];

/// Configuration of `wgmesh-agent install-cni`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallCniArgs {
    /// Directory holding the plugins to install (in the image).
    #[arg(long, env = "WGMESH_CNI_SOURCE_DIR", default_value = "/usr/lib/cni")]
    pub source_dir: PathBuf,
    /// The node's CNI binary directory, as mounted into the container.
    #[arg(long, env = "WGMESH_CNI_DEST_DIR", default_value = "/host/opt/cni/bin")]
    pub dest_dir: PathBuf,
    /// Plugins to install (repeat the flag); default: the ones wgmesh's conflist uses.
    #[arg(long = "plugin", value_name = "NAME")]
    pub plugins: Vec<String>,
}

/// What happened to one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The node had no such file, or a different one: ours is there now.
    Installed,
    /// The node's file was already identical.
    Unchanged,
}

/// Errors installing a plugin.
#[derive(Debug, thiserror::Error)]
pub enum InstallCniError {
    #[error("plugin name {0:?} is not a plain file name")]
    BadName(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Installs one plugin `name` from `source_dir` into `dest_dir`.
pub fn install_one(
    source_dir: &Path,
    dest_dir: &Path,
    name: &str,
) -> Result<Outcome, InstallCniError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(InstallCniError::BadName(name.to_owned()));
    }
    let src = source_dir.join(name);
    let dst = dest_dir.join(name);
    let body = read_all(&src).map_err(|source| InstallCniError::Read {
        path: src.clone(),
        source,
    })?;
    if read_all(&dst).is_ok_and(|old| old == body) {
        return Ok(Outcome::Unchanged);
    }
    let write = |source| InstallCniError::Write {
        path: dst.clone(),
        source,
    };
    std::fs::create_dir_all(dest_dir).map_err(write)?;
    // A dot name, so nothing ever runs it as a plugin; one per plugin and process.
    let tmp = dest_dir.join(format!(".{name}.wgmesh-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write(e));
    }
    Ok(Outcome::Installed)
}

/// Installs every plugin `args` names, logging each; stops at the first failure.
pub fn run(args: &InstallCniArgs) -> Result<(), InstallCniError> {
    let plugins: Vec<&str> = if args.plugins.is_empty() {
        PLUGINS.to_vec()
    } else {
        args.plugins.iter().map(String::as_str).collect()
    };
    for name in plugins {
        let outcome = install_one(&args.source_dir, &args.dest_dir, name)?;
        tracing::info!(plugin = name, dir = %args.dest_dir.display(), ?outcome, "CNI plugin");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("wgmesh-install-cni-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).expect("mkdir");
        dir
    }

    #[test]
    fn installs_the_named_plugins_executable_and_leaves_other_files_alone() {
        let dir = scratch("install");
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        for p in PLUGINS {
            std::fs::write(src.join(p), format!("plugin {p}")).expect("write");
        }
        std::fs::create_dir_all(&dst).expect("mkdir");
        std::fs::write(dst.join("calico"), "someone else's").expect("write");
        std::fs::write(dst.join("bridge"), "an older bridge").expect("write");
        run(&InstallCniArgs {
            source_dir: src.clone(),
            dest_dir: dst.clone(),
            plugins: Vec::new(),
        })
        .expect("install");
        for p in PLUGINS {
            assert_eq!(
                std::fs::read_to_string(dst.join(p)).expect("read"),
                format!("plugin {p}")
            );
            let mode = std::fs::metadata(dst.join(p)).expect("stat").permissions();
            assert_eq!(mode.mode() & 0o777, 0o755, "{p}");
        }
        assert_eq!(
            std::fs::read_to_string(dst.join("calico")).expect("read"),
            "someone else's"
        );
        let mut names: Vec<String> = std::fs::read_dir(&dst)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["bridge", "calico", "host-local", "loopback", "portmap"],
            "no temporary file left behind"
        );
        assert_eq!(
            install_one(&src, &dst, "bridge").expect("again"),
            Outcome::Unchanged
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_missing_plugin_or_a_path_as_a_name_is_an_error_and_writes_nothing() {
        let dir = scratch("errors");
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        assert!(matches!(
            install_one(&src, &dst, "bridge"),
            Err(InstallCniError::Read { .. })
        ));
        assert!(matches!(
            install_one(&src, &dst, "../../etc/passwd"),
            Err(InstallCniError::BadName(_))
        ));
        assert!(!dst.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
