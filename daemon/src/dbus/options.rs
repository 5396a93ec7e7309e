//! Typed reading of `a{sv}` option dictionaries: unknown keys and wrong types are refused with
//! `InvalidArgument` naming the key, before any work is done.

use std::collections::HashMap;

use vmsnap_dbus::Error;
use zbus::{OwnedVariant, Variant};

/// A validated options dictionary.
pub struct Options {
    method: &'static str,
    map: HashMap<String, OwnedVariant>,
}

fn inner<'a>(v: &'a Variant<'a>) -> &'a Variant<'a> {
    match v {
        Variant::Variant(b) => inner(b),
        other => other,
    }
}

impl Options {
    /// Checks that every key is one of `known` for `method`.
    pub fn parse(
        method: &'static str,
        map: HashMap<String, OwnedVariant>,
        known: &[&str],
    ) -> Result<Options, Error> {
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                let hint = if known.is_empty() {
                    "it takes no options".to_string()
                } else {
                    format!("known: {}", known.join(", "))
                };
                return Err(Error::InvalidArgument(format!(
                    "unknown option {key:?} for {method} ({hint})"
                )));
            }
        }
        Ok(Options { method, map })
    }

    fn wrong(&self, key: &str, want: &str) -> Error {
        Error::InvalidArgument(format!("option {key:?} of {} must be {want}", self.method))
    }

    /// A boolean option.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, Error> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        match inner(v) {
            Variant::Bool(b) => Ok(Some(*b)),
            _ => Err(self.wrong(key, "a boolean (b)")),
        }
    }

    /// A non-negative integer option; any integer width is accepted.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, Error> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match inner(v) {
            Variant::U8(n) => Some(u64::from(*n)),
            Variant::U16(n) => Some(u64::from(*n)),
            Variant::U32(n) => Some(u64::from(*n)),
            Variant::U64(n) => Some(*n),
            Variant::I16(n) => u64::try_from(*n).ok(),
            Variant::I32(n) => u64::try_from(*n).ok(),
            Variant::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| self.wrong(key, "a non-negative integer"))
    }

    /// A string option.
    pub fn string(&self, key: &str) -> Result<Option<String>, Error> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        match inner(v) {
            Variant::Str(s) => Ok(Some(s.as_str().to_string())),
            _ => Err(self.wrong(key, "a string (s)")),
        }
    }
}

impl Options {
    /// An array-of-strings option.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>, Error> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let Variant::Array(a) = inner(v) else {
            return Err(self.wrong(key, "an array of strings (as)"));
        };
        let mut out = Vec::new();
        for item in a.iter() {
            match inner(item) {
                Variant::Str(s) => out.push(s.as_str().to_string()),
                _ => return Err(self.wrong(key, "an array of strings (as)")),
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: Vec<(&str, Variant<'static>)>) -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_into_owned().unwrap()))
            .collect()
    }

    #[test]
    fn options_unknown_key_is_refused_with_its_name() {
        let e = Options::parse(
            "Start",
            map(vec![("bogus", Variant::Bool(true))]),
            &["paused"],
        )
        .err()
        .unwrap();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("\"bogus\"") && m.contains("paused"))
        );
    }

    #[test]
    fn options_wrong_type_is_refused() {
        let o =
            Options::parse("Start", map(vec![("paused", Variant::U32(1))]), &["paused"]).unwrap();
        assert!(matches!(o.bool("paused"), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn options_integers_of_any_width_are_accepted() {
        let o = Options::parse(
            "Shutdown",
            map(vec![
                ("timeout", Variant::I32(5)),
                ("neg", Variant::I64(-1)),
            ]),
            &["timeout", "neg"],
        )
        .unwrap();
        assert_eq!(o.uint("timeout").unwrap(), Some(5));
        assert!(o.uint("neg").is_err());
        assert_eq!(o.uint("absent").unwrap(), None);
    }
}
