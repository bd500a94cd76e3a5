//! Property-based fuzzing of the `/execute` NDJSON lines built from what a kernel (user code)
//! sends: any stdout, stderr, error or MIME bundle must give exactly one JSON line the SDKs
//! parse. Cases: PROPTEST_CASES (256 unless set; scripts/fuzz.sh runs 100,000).

use crate::kernel::Event;
use crate::output::event_json;
use proptest::prelude::*;
use serde_json::{Map, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,30}".prop_map(Value::String),
        "[\\x00-\\x1f'\"\\\\\n]{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn mime() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "text/plain",
            "text/html",
            "text/markdown",
            "image/svg+xml",
            "image/png",
            "image/jpeg",
            "application/pdf",
            "text/latex",
            "application/json",
            "application/javascript",
            "application/vnd.alcove.chart+json",
            "application/vnd.alcove.data+json",
        ])
        .prop_map(str::to_string),
        "\\PC{0,20}",
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        any::<usize>().prop_map(Event::ExecutionCount),
        "\\PC{0,200}".prop_map(Event::Stdout),
        "(\\PC|\n|\r|\u{2028}){0,200}".prop_map(Event::Stderr),
        (
            "\\PC{0,20}",
            "\\PC{0,50}",
            prop::collection::vec("\\PC{0,50}", 0..5)
        )
            .prop_map(|(name, value, traceback)| Event::Error {
                name,
                value,
                traceback
            }),
        (
            any::<bool>(),
            prop::collection::btree_map(mime(), json_value(), 0..6)
        )
            .prop_map(|(main, data)| Event::Result {
                main,
                data: data.into_iter().collect::<Map<_, _>>()
            }),
    ]
}

proptest! {
    #[test]
    fn every_event_is_one_json_line_with_a_type(ev in event()) {
        let v = event_json("python", ev);
        let line = serde_json::to_string(&v).unwrap();
        prop_assert!(!line.contains('\n'), "{line}");
        let back: Value = serde_json::from_str(&line).unwrap();
        prop_assert!(back["type"].is_string());
    }

    #[test]
    fn a_results_mime_data_is_kept_or_moved_to_extra(
        main in any::<bool>(),
        data in prop::collection::btree_map(mime(), json_value(), 0..6),
    ) {
        let n = data.len();
        let v = event_json("python", Event::Result { main, data: data.into_iter().collect() });
        let o = v.as_object().unwrap();
        let extra = o.get("extra").and_then(Value::as_object).map_or(0, Map::len);
        // type, is_main_result, one field per known MIME type, the rest in extra
        prop_assert_eq!(o.len() - 2 - usize::from(o.contains_key("extra")) + extra, n);
        prop_assert_eq!(&o["is_main_result"], &Value::Bool(main));
    }
}
