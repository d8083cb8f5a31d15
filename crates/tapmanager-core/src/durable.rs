//! Atomic (and durable) replacement and removal of one small file in a directory, each in one call on the
//! calling thread: the daemon's state records and the CNI cache entries, which a pod's add writes several
//! times, so one blocking call instead of a round trip per syscall.
//!
//! [`replace_file`] is the classic durable replace: a temp file in the same directory is created
//! (`O_EXCL|O_NOFOLLOW`, mode 0600), written, fsynced, renamed over the target, then the directory is fsynced.
//! After a crash at any point the target is the old file, the new one, or (for a first write) absent, never torn;
//! a crash can leave the temp file, which the caller names (so its start-up sweep knows the pattern).
//! [`remove_file`] unlinks and fsyncs the directory. Both act on directory entries (`renameat`/`unlinkat`
//! relative to one fd of the directory), so a symlink at the target name is replaced or removed, never followed.

use std::fs::{DirBuilder, File};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{open, openat, renameat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{close, fsync, unlinkat, UnlinkatFlags};

use crate::error::{Error, Result};

/// How far [`replace_file`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after it: once the call returns, the new file
    /// survives a power loss.
    Durable,
    /// Atomic only (no fsync): a reader or a killed process never sees a torn file, but a power loss may lose
    /// the write (what `writeFile` + `rename` give).
    Atomic,
}

/// A plain name of an entry in a directory: no `/`, no NUL, not `.` or `..`.
fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::invalid(format!("{what} must be a plain file name, not {name:?}")));
    }
    Ok(())
}

/// Opens `dir` to act on its entries (and to fsync it).
fn open_dir(dir: &Path) -> std::result::Result<OwnedFd, Errno> {
    open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
}

/// Atomically replaces `dir/name` with `data`: `dir/temp_name` is created (`O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC|
/// O_NOFOLLOW`, mode 0600 less the umask), written, fsynced and closed, renamed over `name`, then `dir` is fsynced
/// (with [`Durability::Atomic`], neither fsync). A missing `dir` is created first (with its missing parents, mode
/// 0700 less the umask), only then. A symlink at `name` is replaced, not followed; an entry already at
/// `temp_name` fails the call (`ERR_EXISTS`) and is left alone. When a step fails after the temp file was
/// created, the temp file is removed. Errors name the step and the path; their code follows the errno.
///
/// Equivalent to `(umask 077; mkdir -p dir)` (when missing) + `cat > dir/temp_name` + `sync dir/temp_name` +
/// `mv -T dir/temp_name dir/name` + `sync dir`.
pub fn replace_file(dir: &Path, name: &str, temp_name: &str, data: &[u8], durability: Durability) -> Result<()> {
    check_name("name", name)?;
    check_name("temp name", temp_name)?;
    if temp_name == name {
        return Err(Error::invalid(format!("the temp name must differ from the name ({name:?})")));
    }
    let dir_fd = match open_dir(dir) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("create dir {}", dir.display()), e))?;
            open_dir(dir).map_err(|e| Error::errno(format!("open dir {}", dir.display()), e))?
        }
        Err(e) => return Err(Error::errno(format!("open dir {}", dir.display()), e)),
    };
    let temp_path = dir.join(temp_name);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let temp = openat(&dir_fd, temp_name, flags, Mode::from_bits_truncate(0o600))
        .map_err(|e| Error::errno(format!("create {}", temp_path.display()), e))?;
    let written = write_temp(temp, data, durability, &temp_path).and_then(|()| {
        renameat(&dir_fd, temp_name, &dir_fd, name)
            .map_err(|e| Error::errno(format!("rename {} to {name}", temp_path.display()), e))
    });
    if let Err(e) = written {
        // Ours (O_EXCL): nothing else can have put a file at this name meanwhile, save another writer that
        // was handed the same temp name, which the callers' random part rules out.
        let _ = unlinkat(&dir_fd, temp_name, UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    if durability == Durability::Durable {
        fsync(&dir_fd).map_err(|e| Error::errno(format!("fsync dir {}", dir.display()), e))?;
    }
    Ok(())
}

/// Writes all of `data` to the new temp file, fsyncs it (when durable) and closes it, reporting a failed close.
fn write_temp(temp: OwnedFd, data: &[u8], durability: Durability, path: &Path) -> Result<()> {
    let mut file = File::from(temp);
    file.write_all(data).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    if durability == Durability::Durable {
        // fsync, not fdatasync: the file is new, its size and its inode must reach the disk too.
        fsync(file.as_fd()).map_err(|e| Error::errno(format!("fsync {}", path.display()), e))?;
    }
    close(file).map_err(|e| Error::errno(format!("close {}", path.display()), e))
}

/// Removes `dir/name` (the entry itself: a symlink is removed, not followed) and fsyncs `dir`. Returns `false`,
/// and does nothing else, when there was no such entry (or no `dir`). A directory at `name` is an error.
///
/// Equivalent to `rm -f dir/name` + `sync dir`.
pub fn remove_file(dir: &Path, name: &str) -> Result<bool> {
    check_name("name", name)?;
    let dir_fd = match open_dir(dir) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(Error::errno(format!("open dir {}", dir.display()), e)),
    };
    match unlinkat(&dir_fd, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(Error::errno(format!("remove {}", dir.join(name).display()), e)),
    }
    fsync(&dir_fd).map_err(|e| Error::errno(format!("fsync dir {}", dir.display()), e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_then_replaces_with_mode_0600() {
        let t = tempfile::tempdir().unwrap();
        replace_file(t.path(), "a.json", ".a.json.tmp-1-00", b"one", Durability::Durable).unwrap();
        assert_eq!(fs::read(t.path().join("a.json")).unwrap(), b"one");
        assert_eq!(mode(&t.path().join("a.json")), 0o600);
        replace_file(t.path(), "a.json", ".a.json.tmp-1-01", b"two, longer", Durability::Durable).unwrap();
        assert_eq!(fs::read(t.path().join("a.json")).unwrap(), b"two, longer");
        replace_file(t.path(), "a.json", ".a.json.tmp-1-02", b"3", Durability::Atomic).unwrap();
        assert_eq!(fs::read(t.path().join("a.json")).unwrap(), b"3");
        assert_eq!(names(t.path()), ["a.json"], "no temp file left");
    }

    #[test]
    fn a_missing_dir_is_created_0700_with_its_parents() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("not/there");
        replace_file(&dir, "k.json", ".k.json.tmp-1-00", b"{}", Durability::Durable).unwrap();
        assert_eq!(fs::read(dir.join("k.json")).unwrap(), b"{}");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&t.path().join("not")), 0o700);
    }

    #[test]
    fn a_failed_rename_leaves_no_temp_and_the_target_as_it_was() {
        let t = tempfile::tempdir().unwrap();
        // A non-empty directory at the target name: the rename fails after the temp was written.
        fs::create_dir(t.path().join("d.json")).unwrap();
        fs::write(t.path().join("d.json/inside"), b"x").unwrap();
        let e = replace_file(t.path(), "d.json", ".d.json.tmp-1-00", b"new", Durability::Durable).unwrap_err();
        assert!(
            e.message.starts_with(&format!("rename {}/.d.json.tmp-1-00 to d.json: ", t.path().display())),
            "{}",
            e.message
        );
        assert_eq!(names(t.path()), ["d.json"], "the temp file was removed");
        assert_eq!(fs::read(t.path().join("d.json/inside")).unwrap(), b"x");
    }

    #[test]
    fn an_entry_at_the_temp_name_is_refused_and_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        symlink(&victim, t.path().join(".k.json.tmp-1-00")).unwrap();
        let e = replace_file(t.path(), "k.json", ".k.json.tmp-1-00", b"new", Durability::Durable).unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists, "{}", e.message);
        assert!(!victim.exists(), "the symlink was not followed");
        assert_eq!(names(t.path()), [".k.json.tmp-1-00"], "not ours: not removed");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        symlink(&victim, t.path().join("k.json")).unwrap();
        replace_file(t.path(), "k.json", ".k.json.tmp-1-00", b"new", Durability::Durable).unwrap();
        assert!(fs::symlink_metadata(t.path().join("k.json")).unwrap().file_type().is_file());
        assert_eq!(fs::read(t.path().join("k.json")).unwrap(), b"new");
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn a_dir_that_is_a_file_or_bad_names_fail_before_anything_is_written() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("f");
        fs::write(&file, b"").unwrap();
        let e = replace_file(&file, "k.json", ".k.json.tmp", b"x", Durability::Durable).unwrap_err();
        assert!(e.message.starts_with(&format!("open dir {}: ", file.display())), "{}", e.message);
        for (name, temp) in [("a/b", ".t"), ("k", "../t"), ("..", ".t"), ("k", ""), ("k", "k"), ("k\0", ".t")] {
            let e = replace_file(t.path(), name, temp, b"x", Durability::Durable).unwrap_err();
            assert_eq!(e.code, ErrorCode::Invalid, "{name:?} {temp:?}");
        }
        assert_eq!(names(t.path()), ["f"]);
    }

    #[test]
    fn remove_says_whether_there_was_one() {
        let t = tempfile::tempdir().unwrap();
        replace_file(t.path(), "k.json", ".k.json.tmp-1-00", b"x", Durability::Durable).unwrap();
        assert!(remove_file(t.path(), "k.json").unwrap());
        assert!(!remove_file(t.path(), "k.json").unwrap());
        let missing = t.path().join("missing");
        assert!(!remove_file(&missing, "k.json").unwrap());
        assert!(!missing.exists(), "removing does not create the dir");
        // A symlink is removed itself.
        let victim = t.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        symlink(&victim, t.path().join("l.json")).unwrap();
        assert!(remove_file(t.path(), "l.json").unwrap());
        assert_eq!(names(t.path()), ["victim"]);
        fs::create_dir(t.path().join("d.json")).unwrap();
        let e = remove_file(t.path(), "d.json").unwrap_err();
        assert!(e.message.starts_with(&format!("remove {}/d.json: ", t.path().display())), "{}", e.message);
    }
}
