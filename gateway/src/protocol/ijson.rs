//! RFC 7493 (I-JSON) for a publish's `data`: the checks that JSON parsers
//! disagree on, made before the gateway relays the bytes to every member.
//!
//! [`Interoperable`] parses a value only to check it (nothing is kept):
//! - numbers within a double's range, strings without unpaired surrogate
//!   escapes (section 2.1; serde_json refuses both while parsing);
//! - no object with two members of the same name, compared after escapes
//!   are decoded (section 2.3): JavaScript's `JSON.parse` keeps the last of
//!   them, other parsers the first or an error, so members would read
//!   different values from the same message.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value that passed the checks (see the module doc).
pub(super) struct Interoperable;

impl<'de> Deserialize<'de> for Interoperable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Check)
    }
}

struct Check;

impl<'de> Visitor<'de> for Check {
    type Value = Interoperable;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Interoperable, E> {
        Ok(Interoperable)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Interoperable, E> {
        Ok(Interoperable)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Interoperable, E> {
        Ok(Interoperable)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Interoperable, E> {
        Ok(Interoperable)
    }

    fn visit_str<E>(self, _: &str) -> Result<Interoperable, E> {
        Ok(Interoperable)
    }

    fn visit_unit<E>(self) -> Result<Interoperable, E> {
        Ok(Interoperable)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Interoperable, A::Error> {
        while seq.next_element::<Interoperable>()?.is_some() {}
        Ok(Interoperable)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Interoperable, A::Error> {
        let mut seen = HashSet::<Cow<'de, str>, foldhash::fast::RandomState>::default();
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            if seen.contains(&name) {
                return Err(de::Error::custom(format_args!(
                    "an object has two members named {name:?} (RFC 7493 2.3)"
                )));
            }
            seen.insert(name);
            map.next_value::<Interoperable>()?;
        }
        Ok(Interoperable)
    }
}

/// A member name, decoded; borrowed from the input when it has no escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E>(self, s: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}
