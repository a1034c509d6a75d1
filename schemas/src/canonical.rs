//! Canonical JSON: the same value always serializes to the same bytes, so a blake3 of those bytes
//! names the value. Object keys are sorted at every depth and nothing is indented, whatever order
//! the value was built in (serde_json's `preserve_order` feature, if some dependency turns it on,
//! would otherwise leak insertion order into the bytes).

use serde::Serialize;
use serde_json::Value;

use crate::digest::Digest;

pub fn to_canonical_json<T: Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    let value = serde_json::to_value(value)?;
    let mut out = Vec::new();
    write_value(&value, &mut out)?;
    Ok(out)
}

pub fn canonical_digest<T: Serialize>(value: &T) -> serde_json::Result<Digest> {
    Ok(Digest::of(&to_canonical_json(value)?))
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (index, (key, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_value(value, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn sorts_keys_at_every_depth_and_is_compact() {
        let value = json!({"b": [ {"z": 1, "a": null} ], "a": "é\n", "c": 1.5});
        assert_eq!(
            String::from_utf8(to_canonical_json(&value).unwrap()).unwrap(),
            r#"{"a":"é\n","b":[{"a":null,"z":1}],"c":1.5}"#
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::vec(("[a-z]{0,4}", inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn reparsing_canonical_bytes_gives_the_same_bytes(value in json_value()) {
            let bytes = to_canonical_json(&value).unwrap();
            let reparsed: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&reparsed, &value);
            prop_assert_eq!(to_canonical_json(&reparsed).unwrap(), bytes);
        }
    }
}
