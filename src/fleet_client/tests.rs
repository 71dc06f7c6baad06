use super::*;

#[test]
fn names_are_escaped_like_fleetctl() {
    assert_eq!(escape_name("web@1.service"), "web%401.service");
    assert_eq!(escape_name("a-b_c.d:e.service"), "a-b_c.d:e.service");
}

#[test]
fn page_tokens_are_fleets() {
    assert_eq!(encode_page_token(100, 2), "ZAACAA==");
    assert_eq!(encode_page_token(2, 2), "AgACAA==");
    assert_eq!(decode_page_token("ZAACAA=="), Some((100, 2)));
    for other in ["", "second", "AgAC", "AAACAA==", "AgAAAA==", "AgACAAA="] {
        assert_eq!(decode_page_token(other), None, "{other:?}");
    }
}

#[test]
fn civil_dates() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(20_417), (2025, 11, 25));
}

#[test]
fn error_texts_match_googleapi() {
    let e = ApiError::Api {
        code: 503,
        message: "fleet server unable to communicate with etcd".into(),
    };
    assert_eq!(
        e.to_string(),
        "googleapi: Error 503: fleet server unable to communicate with etcd"
    );
}
