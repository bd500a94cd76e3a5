//! Property-based fuzzing of the `/init` body (`InitRequest`), the JSON the agent reads from the
//! host on every claim, resume and fork. Cases: PROPTEST_CASES (256 unless set; scripts/fuzz.sh
//! runs 100,000).

use alcove_guest_contract::InitRequest;
use proptest::prelude::*;

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of("\\PC{0,40}")
}

proptest! {
    #[test]
    fn any_bytes_parse_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = serde_json::from_slice::<InitRequest>(&bytes);
    }

    #[test]
    fn json_shaped_bodies_parse_or_fail_without_panicking(
        fields in prop::collection::vec((
            prop::sample::select(vec!["envVars", "accessToken", "timestamp", "defaultUser", "defaultWorkdir", "hostname", "entropy", "sandboxId", "x"]),
            prop_oneof![
                Just("null".to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                "\\PC{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                prop::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..3).prop_map(|m| serde_json::to_string(&m).unwrap()),
                Just("[]".to_string()),
            ],
        ), 0..8),
    ) {
        let body = format!(
            "{{{}}}",
            fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect::<Vec<_>>().join(",")
        );
        let _ = serde_json::from_str::<InitRequest>(&body);
    }

    #[test]
    fn init_requests_round_trip(
        env_vars in prop::option::of(prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,10}", "\\PC{0,30}", 0..5)),
        access_token in opt_text(),
        timestamp in opt_text(),
        default_user in opt_text(),
        default_workdir in opt_text(),
        hostname in opt_text(),
        entropy in opt_text(),
        sandbox_id in opt_text(),
    ) {
        // fields added later keep their defaults
        #[allow(clippy::needless_update)]
        let r = InitRequest {
            env_vars, access_token, timestamp, default_user, default_workdir, hostname, entropy,
            sandbox_id,
            ..Default::default()
        };
        let json = serde_json::to_vec(&r).unwrap();
        prop_assert_eq!(serde_json::from_slice::<InitRequest>(&json).unwrap(), r);
    }
}
