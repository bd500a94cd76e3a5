//! Builds a template with the given agent binary and restores it N times, printing timings.
//! A development probe for the VM layer: `cargo run -p alcove-image --example restore_probe -- AGENT N`.
use std::sync::Arc;
use std::time::Instant;

use alcove_vmm::{Disk, DiskFormat, QemuVmm, Vm, Vmm};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let agent = std::path::PathBuf::from(&args[1]);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cache = std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/alcove");
    let vmm = QemuVmm::new(alcove_vmm::accel::detect(None));
    let progress: alcove_image::build::Progress = Arc::new(|e| eprintln!("{e:?}"));
    let recipe = alcove_image::Recipe::builtin("base").unwrap();
    let opts = alcove_image::BuildOptions { cache_dir: cache.clone(), agent_bin: agent, vmm: vmm.clone(), force: false, progress };
    let t = alcove_image::build_template(&recipe, &opts).await.unwrap();
    println!("template {} built in {:.1}s", t.key, t.build_secs);
    for i in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        std::fs::copy(&t.overlay, &disk).unwrap();
        let mut spec = alcove_image::build::spec_for(&t.recipe, dir.path(), &t.kernel);
        spec.ram_file = t.mem.clone();
        spec.disk = Disk { path: disk, format: DiskFormat::Qcow2, read_only: false };
        let t0 = Instant::now();
        let (vm, timings) = vmm.restore(&spec, &t.state).await.unwrap();
        let total = t0.elapsed();
        tokio::time::sleep(std::time::Duration::from_millis(if i == 0 { 3000 } else { 300 })).await;
        if i == 0 { let _ = std::process::Command::new("sh").arg("/tmp/pss.sh").status(); }
        println!("restore {i}: {timings:?} total {total:?} pid {} console tail: {:?}", vm.pid(), vm.console().tail(2));
        vm.kill().await;
    }
}
