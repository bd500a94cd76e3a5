//! Accelerator choice. `/dev/kvm` is used only when it is hardware KVM: on hosts whose `/dev/kvm`
//! is PVM (a nested paravirtual hypervisor that only runs PVM-patched guest kernels), ordinary
//! guest kernels crash in early boot, so we fall back to TCG and say why.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator and the reason it was chosen (logged at start-up, shown in `alcove info`).
#[derive(Debug, Clone)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Picks KVM or TCG. `forced` comes from configuration (`ALCOVE_ACCEL=kvm|tcg`).
pub fn detect(forced: Option<Accel>) -> AccelChoice {
    detect_in(Path::new("/"), forced)
}

fn detect_in(root: &Path, forced: Option<Accel>) -> AccelChoice {
    if let Some(accel) = forced {
        return AccelChoice { accel, reason: format!("forced to {} by configuration", accel.as_str()) };
    }
    let tcg = |reason: &str| AccelChoice { accel: Accel::Tcg, reason: reason.to_string() };
    if !root.join("dev/kvm").exists() {
        return tcg("/dev/kvm does not exist; using TCG (software emulation, much slower)");
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return tcg(
            "/dev/kvm is PVM (kvm_pvm module), which cannot run an unmodified guest kernel; \
             using TCG (software emulation). Run on a host with hardware VMX/SVM KVM for full speed",
        );
    }
    if !(root.join("sys/module/kvm_intel").exists() || root.join("sys/module/kvm_amd").exists()) {
        return tcg("/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded; using TCG");
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(root.join("dev/kvm")) {
        Ok(_) => AccelChoice { accel: Accel::Kvm, reason: "hardware KVM".to_string() },
        Err(e) => tcg(&format!("/dev/kvm cannot be opened ({e}); using TCG")),
    }
}

/// The host TSC frequency in kHz, passed to TCG guests as `tsc_early_khz`: without it, TSC
/// calibration on `-M microvm` (no PIT/HPET) fails now and then and the guest hangs.
pub fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0).round() as u64)
        .filter(|&khz| khz > 100_000)
        .unwrap_or(2_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        dir
    }

    #[test]
    fn pvm_means_tcg() {
        let root = root_with(&["dev/kvm", "sys/module/kvm_pvm/x", "sys/module/kvm_intel/x"]);
        let c = detect_in(root.path(), None);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
    }

    #[test]
    fn no_kvm_device_means_tcg() {
        let root = root_with(&[]);
        assert_eq!(detect_in(root.path(), None).accel, Accel::Tcg);
    }

    #[test]
    fn hardware_kvm_is_used() {
        let root = root_with(&["dev/kvm", "sys/module/kvm_intel/x"]);
        let c = detect_in(root.path(), None);
        assert_eq!(c.accel, Accel::Kvm, "{}", c.reason);
    }

    #[test]
    fn forced_wins() {
        let root = root_with(&["dev/kvm", "sys/module/kvm_pvm/x"]);
        assert_eq!(detect_in(root.path(), Some(Accel::Kvm)).accel, Accel::Kvm);
    }

    #[test]
    fn tsc_is_plausible() {
        assert!(host_tsc_khz() > 100_000);
    }
}
