//! PID 1 duties in the guest: mount the API filesystems, bring `lo` up, set a sane environment,
//! then fork. The parent stays PID 1 and only reaps orphans (and restarts the agent if it dies);
//! the child returns and becomes the agent. Keeping the reaper in another process means nothing
//! races tokio's own `waitpid` for the agent's children.
//!
//! Called from `main` before any thread exists: `fork` and `setenv` rely on that.

use std::io;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {target}")]
    Mount {
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("fork the agent")]
    Fork(#[source] Errno),
}

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Sets the system up, then forks; returns only in the agent child.
pub fn pid1_then_fork() -> Result<(), InitError> {
    setup_system()?;
    loop {
        // SAFETY: called from main before the runtime or any other thread is started, so the
        // child is a complete copy of a single-threaded process.
        match unsafe { fork() }.map_err(InitError::Fork)? {
            ForkResult::Child => return Ok(()),
            ForkResult::Parent { child } => {
                reap_until_exit(child);
                eprintln!("alcove-agent: agent process {child} exited; restarting in 1s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Reaps every child (orphans included) until `agent` itself has exited.
fn reap_until_exit(agent: Pid) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _))
                if pid == agent =>
            {
                return;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn setup_system() -> Result<(), InitError> {
    let none: Option<&str> = None;
    let nodev_noexec_nosuid = MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID;
    mount_once("proc", "/proc", "proc", nodev_noexec_nosuid, none)?;
    mount_once("sysfs", "/sys", "sysfs", nodev_noexec_nosuid, none)?;
    mount_once(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nodev_noexec_nosuid,
        none,
    )?;
    mount_once(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // /dev/ptmx must open the new devpts instance, not devtmpfs's node.
    let _ = std::fs::remove_file("/dev/ptmx");
    if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
        eprintln!("alcove-agent: symlink /dev/ptmx: {e}");
    }
    mount_once(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_once(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    if let Err(e) = loopback_up() {
        eprintln!("alcove-agent: bring lo up: {e}");
    }
    // SAFETY: no other thread exists yet (see the module doc), so nothing reads the environment
    // concurrently.
    unsafe {
        std::env::set_var("PATH", PATH);
        std::env::set_var("HOME", "/root");
        std::env::set_var("LANG", "C.UTF-8");
    }
    let _ = std::env::set_current_dir("/");
    Ok(())
}

/// Mounts unless something is mounted there already (EBUSY), creating the mount point.
fn mount_once(
    source: &str,
    target: &'static str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    if !Path::new(target).exists() {
        let _ = std::fs::create_dir_all(target);
    }
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount { target, source }),
    }
}

/// `ip link set lo up`, by ioctl on a throwaway socket.
pub fn loopback_up() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `req` into `req`, which
    // lives for the call; the fd is an open socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req` (name and flags) for the call only.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
