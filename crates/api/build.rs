//! Installs the dashboard's browser libraries (xterm.js, uPlot) from npm, pinned by
//! `dashboard-js/package-lock.json`, into `OUT_DIR`, where `src/dashboard/assets.rs` embeds them:
//! the binary serves them itself and the dashboard loads nothing from elsewhere.
//!
//! `ALCOVE_DASHBOARD_NODE_MODULES` may name an installed `node_modules` instead (a machine
//! without npm access); otherwise `npm ci` runs once per lockfile.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=dashboard-js/package.json");
    println!("cargo:rerun-if-changed=dashboard-js/package-lock.json");
    println!("cargo:rerun-if-env-changed=ALCOVE_DASHBOARD_NODE_MODULES");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let link = out.join("dashboard-node-modules");
    let modules = match std::env::var_os("ALCOVE_DASHBOARD_NODE_MODULES") {
        Some(dir) => PathBuf::from(dir),
        None => install(&out.join("dashboard-js")),
    };
    for file in FILES {
        let from = modules.join(file);
        assert!(
            from.is_file(),
            "dashboard asset {} is missing: the npm install is incomplete",
            from.display()
        );
        let to = link.join(file);
        std::fs::create_dir_all(to.parent().expect("has a parent")).expect("create OUT_DIR dirs");
        std::fs::copy(&from, &to).expect("copy a dashboard asset into OUT_DIR");
    }
}

/// The files the dashboard serves (see `src/dashboard/assets.rs`).
const FILES: &[&str] = &[
    "@xterm/xterm/lib/xterm.js",
    "@xterm/xterm/css/xterm.css",
    "@xterm/addon-fit/lib/addon-fit.js",
    "uplot/dist/uPlot.iife.min.js",
    "uplot/dist/uPlot.min.css",
];

/// `npm ci` into `dir` unless the same lockfile is already installed there.
fn install(dir: &Path) -> PathBuf {
    let src = Path::new("dashboard-js");
    let lock = std::fs::read(src.join("package-lock.json")).expect("read package-lock.json");
    let stamp = dir.join("installed.lock");
    let modules = dir.join("node_modules");
    if std::fs::read(&stamp).ok().as_deref() == Some(&lock[..]) && modules.is_dir() {
        return modules;
    }
    std::fs::create_dir_all(dir).expect("create OUT_DIR/dashboard-js");
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy the npm manifest");
    }
    let status = Command::new("npm")
        .args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--silent",
        ])
        .current_dir(dir)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "`npm ci` for the dashboard's browser libraries failed ({s}): it needs the npm \
             registry, or set ALCOVE_DASHBOARD_NODE_MODULES to an installed node_modules"
        ),
        Err(e) => panic!(
            "could not run npm ({e}): the dashboard embeds xterm.js and uPlot from npm; install \
             Node.js and npm (Debian: `apt install npm`) or set ALCOVE_DASHBOARD_NODE_MODULES"
        ),
    }
    std::fs::write(&stamp, &lock).expect("write the install stamp");
    modules
}
