//! Property-based fuzzing of template recipe files (TOML from the operator or a build request) and
//! of OCI image layers and configs (from any registry a build names).
//! Cases: PROPTEST_CASES (256 unless set; scripts/fuzz.sh runs 100,000).

use std::collections::BTreeMap;

use alcove_image::Recipe;
use proptest::prelude::*;

fn valid(r: &Recipe) -> bool {
    !r.name.is_empty()
        && r.name.len() <= 64
        && (1..=16).contains(&r.vcpus)
        && (128..=65536).contains(&r.memory_mib)
        && (1024..=1_048_576).contains(&r.disk_mib)
        && r.files
            .keys()
            .all(|p| p.starts_with('/') && !p.split('/').any(|c| c == ".."))
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "\\PC{0,20}".prop_map(|s| format!("{s:?}")),
        prop::collection::vec("\\PC{0,10}".prop_map(|s| format!("{s:?}")), 0..4)
            .prop_map(|v| format!("[{}]", v.join(", "))),
        Just("true".to_string()),
        Just("{}".to_string()),
    ]
}

proptest! {
    #[test]
    fn any_text_parses_or_fails_without_panicking(text in "\\PC{0,400}") {
        if let Ok(r) = Recipe::parse(&text) {
            prop_assert!(valid(&r));
        }
    }

    #[test]
    fn toml_shaped_text_parses_only_into_valid_recipes(
        fields in prop::collection::vec((prop::sample::select(vec!["name", "vcpus", "memory_mib", "disk_mib", "apt", "pip", "npm", "start_cmd", "ready_cmd", "run", "other"]), toml_value()), 0..10),
        files in prop::collection::vec(("[/a-z.]{0,12}", "\\PC{0,10}"), 0..3),
    ) {
        let mut text = String::new();
        for (k, v) in &fields {
            text.push_str(&format!("{k} = {v}\n"));
        }
        if !files.is_empty() {
            text.push_str("[files]\n");
            for (p, c) in &files {
                text.push_str(&format!("{p:?} = {c:?}\n"));
            }
        }
        if let Ok(r) = Recipe::parse(&text) {
            prop_assert!(valid(&r), "{text}");
        }
    }

    #[test]
    fn valid_recipes_round_trip_through_toml(
        name in "[a-z0-9_-]{1,64}",
        vcpus in 1u32..=16,
        memory_mib in 128u32..=65536,
        disk_mib in 1024u32..=1_048_576,
        apt in prop::collection::vec("[a-z0-9.+-]{1,20}", 0..4),
        files in prop::collection::btree_map("(/[a-z0-9._-]{1,8}){1,4}", "\\PC{0,40}", 0..4),
        env in prop::collection::btree_map("[A-Z_]{1,10}", "\\PC{0,20}", 0..4),
        start_cmd in prop::option::of("\\PC{0,40}"),
        run in prop::collection::vec("\\PC{0,40}", 0..3),
    ) {
        let files: BTreeMap<String, String> =
            files.into_iter().filter(|(p, _)| !p.split('/').any(|c| c == "..")).collect();
        let r = Recipe {
            name, vcpus, memory_mib, disk_mib, apt, pip: vec![], npm: vec![], files, env,
            start_cmd, start_user: None, ready_cmd: None, run,
        };
        let text = toml::to_string(&r).unwrap();
        let back = Recipe::parse(&text).unwrap();
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(back.canonical(), r.canonical());
    }
}

#[test]
fn builtin_recipes_parse() {
    for n in Recipe::builtin_names() {
        let r = Recipe::builtin(n).unwrap();
        assert!(valid(&r), "{n}");
    }
}

/// OCI layers: random entries (`..`, absolute paths, symlinks to the outside, hard links,
/// whiteouts, device nodes) over several layers never write outside the root and never panic.
#[path = "common/registry.rs"]
mod registry;

mod layers {
    use super::registry::Layer;
    use alcove_image::oci::{UnpackLimits, Unpacker};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Entry {
        File(String),
        Dir(String),
        Symlink(String, String),
        Hardlink(String, String),
        Device(String),
    }

    fn path() -> impl Strategy<Value = String> {
        let comp = prop_oneof![
            Just("a"),
            Just("b"),
            Just(".."),
            Just("."),
            Just(""),
            Just(".wh.a"),
            Just(".wh..wh..opq"),
            Just("link"),
        ];
        (any::<bool>(), prop::collection::vec(comp, 1..5)).prop_map(|(abs, c)| {
            let p = c.join("/");
            if abs { format!("/{p}") } else { p }
        })
    }

    fn target() -> impl Strategy<Value = String> {
        prop_oneof![path(), Just("OUT".to_string()), Just("OUT/x".to_string())]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            path().prop_map(Entry::File),
            path().prop_map(Entry::Dir),
            (path(), target()).prop_map(|(p, t)| Entry::Symlink(p, t)),
            (path(), target()).prop_map(|(p, t)| Entry::Hardlink(p, t)),
            path().prop_map(Entry::Device),
        ]
    }

    fn tar(entries: &[Entry], out: &str) -> Vec<u8> {
        let t = |s: &str| s.replace("OUT", out);
        let mut l = Layer::new();
        for e in entries {
            l = match e {
                Entry::File(p) => l.file(p, 0o644, b"data"),
                Entry::Dir(p) => l.dir(p),
                Entry::Symlink(p, x) => l.symlink(p, &t(x)),
                Entry::Hardlink(p, x) => l.hardlink(p, &t(x)),
                Entry::Device(p) => l.device(p),
            };
        }
        l.tar()
    }

    proptest! {
        #[test]
        fn hostile_layers_stay_inside_the_root(
            layers in prop::collection::vec(prop::collection::vec(entry(), 0..12), 1..4)
        ) {
            let t = tempfile::tempdir().unwrap();
            let root = t.path().join("root");
            let outside = t.path().join("outside");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::create_dir_all(&outside).unwrap();
            std::fs::write(outside.join("x"), b"host").unwrap();
            let out = outside.display().to_string();
            let mut u = Unpacker::new(&root, UnpackLimits { max_bytes: 1 << 20, max_entries: 1000 });
            for (i, entries) in layers.iter().enumerate() {
                if u.layer(i + 1, &tar(entries, &out)[..]).is_err() {
                    break;
                }
            }
            u.finish();
            let names: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
            prop_assert_eq!(names, vec![std::ffi::OsString::from("x")]);
            prop_assert_eq!(std::fs::read(outside.join("x")).unwrap(), b"host".to_vec());
            let top: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            prop_assert_eq!(top.len(), 2);
        }

        #[test]
        fn any_layer_bytes_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let t = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(t.path(), UnpackLimits { max_bytes: 1 << 20, max_entries: 1000 });
            let _ = u.layer_blob(1, &bytes[..]);
        }

        #[test]
        fn any_image_config_parses_or_fails_without_panicking(text in "\\PC{0,300}") {
            let _ = alcove_image::oci::parse_config(text.as_bytes());
        }
    }
}
