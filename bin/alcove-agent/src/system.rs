//! Guest system knobs /init turns: wall clock, hostname, kernel entropy. Only ever called in
//! the guest (the host-test mode records /init without touching the machine).

use std::io::{self, Write};

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_gettime, clock_settime};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(
        "hostname must be 1-63 characters of letters, digits and '-', not starting or ending with '-'"
    )]
    BadHostname,
    #[error("sethostname")]
    SetHostname(#[source] nix::errno::Errno),
    #[error("write {path}")]
    WriteFile {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("open /dev/urandom")]
    OpenRandom(#[source] io::Error),
    #[error("RNDADDENTROPY")]
    AddEntropy(#[source] io::Error),
    #[error("RNDRESEEDCRNG")]
    Reseed(#[source] io::Error),
    #[error("clock_settime")]
    SetClock(#[source] nix::errno::Errno),
}

pub fn validate_hostname(h: &str) -> Result<(), SystemError> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && !h.starts_with('-')
        && !h.ends_with('-')
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SystemError::BadHostname)
    }
}

/// sethostname, /etc/hostname, and a `127.0.1.1 <name>` line in /etc/hosts.
pub fn set_hostname(h: &str) -> Result<(), SystemError> {
    validate_hostname(h)?;
    nix::unistd::sethostname(h).map_err(SystemError::SetHostname)?;
    std::fs::write("/etc/hostname", format!("{h}\n")).map_err(|source| SystemError::WriteFile {
        path: "/etc/hostname",
        source,
    })?;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut out: Vec<String> = hosts
        .lines()
        .filter(|l| !l.trim_start().starts_with("127.0.1.1"))
        .map(str::to_owned)
        .collect();
    out.push(format!("127.0.1.1\t{h}"));
    let text = out.join("\n") + "\n";
    std::fs::write("/etc/hosts", text).map_err(|source| SystemError::WriteFile {
        path: "/etc/hosts",
        source,
    })
}

pub fn realtime_ns() -> i128 {
    clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(0)
}

pub fn set_realtime_ns(ns: i128) -> Result<(), SystemError> {
    let ts = TimeSpec::new((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i64);
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(SystemError::SetClock)
}

// <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `bytes` into the input pool crediting all of them, then forces a CRNG reseed so the
/// very next getrandom() differs from any other clone of the same snapshot.
pub fn add_entropy(bytes: &[u8]) -> Result<(), SystemError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(SystemError::OpenRandom)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // Pad to whole u32 words, as the struct's flexible array is of __u32.
    while info.len() % 4 != 0 {
        info.push(0);
    }
    // SAFETY: the buffer is a complete rand_pool_info (header plus buf_size bytes) that lives
    // for the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc < 0 {
        return Err(SystemError::AddEntropy(io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open /dev/urandom.
    unsafe { rnd_reseed_crng(f.as_raw_fd()) }.map_err(|e| SystemError::Reseed(e.into()))?;
    // Writing also mixes the bytes in (uncredited), harmless and a fallback on old kernels.
    let _ = (&f).write_all(bytes);
    Ok(())
}
