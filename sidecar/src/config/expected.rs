//! The endpoints an injected pod asked for (`--expect-endpoints`), whose files may not have
//! arrived yet: the ConfigMap of an LlmEndpoint created after the pod, or not rendered yet,
//! is simply absent from the projected volume until the kubelet adds it.

use std::str::FromStr;

use super::validate::is_dns_label;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedEndpoints {
    /// `*`: whatever the directory holds, possibly nothing; none is ever reported missing.
    Any,
    /// These names; each one without a file is reported missing and answered with a 503.
    Named(Vec<String>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExpectedEndpointsError {
    #[error("no endpoint names (give comma-separated names, or * for whatever is there)")]
    Empty,
    /// Quoted with escapes, so that whatever the annotation held prints on one line.
    #[error("{name:?} is not a valid endpoint name: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit")]
    InvalidName { name: String },
}

impl FromStr for ExpectedEndpoints {
    type Err = ExpectedEndpointsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim() == "*" {
            return Ok(Self::Any);
        }
        let mut names: Vec<String> = Vec::new();
        // Blank items are tolerated: an annotation such as "chat, embed," is still clear.
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !is_dns_label(name) {
                return Err(ExpectedEndpointsError::InvalidName {
                    name: name.to_string(),
                });
            }
            if !names.iter().any(|known| known == name) {
                names.push(name.to_string());
            }
        }
        if names.is_empty() {
            return Err(ExpectedEndpointsError::Empty);
        }
        Ok(Self::Named(names))
    }
}

impl ExpectedEndpoints {
    /// The expected names that `present` lacks, in the order they were given.
    pub fn missing(&self, present: impl Fn(&str) -> bool) -> Vec<String> {
        match self {
            Self::Any => Vec::new(),
            Self::Named(names) => names.iter().filter(|n| !present(n)).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_deduplicated_and_kept_in_order() {
        assert_eq!(
            " embed,chat , embed,".parse(),
            Ok(ExpectedEndpoints::Named(vec![
                "embed".into(),
                "chat".into()
            ]))
        );
        assert_eq!("*".parse(), Ok(ExpectedEndpoints::Any));
    }

    #[test]
    fn bad_names_are_refused() {
        let err = "chat,Bad_Name".parse::<ExpectedEndpoints>().unwrap_err();
        assert!(err.to_string().starts_with("\"Bad_Name\" is not"), "{err}");
        assert_eq!(
            " , ".parse::<ExpectedEndpoints>(),
            Err(ExpectedEndpointsError::Empty)
        );
        assert!("chat,*".parse::<ExpectedEndpoints>().is_err());
    }

    #[test]
    fn missing_lists_the_names_not_present() {
        let expected: ExpectedEndpoints = "chat,embed".parse().unwrap();
        assert_eq!(expected.missing(|n| n == "chat"), ["embed"]);
        assert!(ExpectedEndpoints::Any.missing(|_| false).is_empty());
    }
}
