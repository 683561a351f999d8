//! SASL pieces shared by SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034): base64 lines and the
//! PLAIN mechanism (RFC 4616). LOGIN is just two base64 lines and needs nothing more.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Longest SASL response line, CRLF included (RFC 4954 §4).
pub const MAX_SASL_LINE: usize = 12_288;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed PLAIN message")]
    Malformed,
    #[error("authorization identity differs from the authentication identity")]
    AuthzidNotAllowed,
}

/// Decode a client response line; `=` is the empty response (RFC 4954 §4).
pub fn decode(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    let line = line.trim_ascii();
    if line == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslError::Base64)
}

pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`. Acting for another user is not allowed, so
/// authzid must be empty or the same as authcid. Returns (user, password).
pub fn parse_plain(message: &[u8]) -> Result<(String, String), SaslError> {
    let mut parts = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    if authcid.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::AuthzidNotAllowed);
    }
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed);
    Ok((text(authcid)?, text(password)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain() {
        let line = encode(b"\0sam\0secret pw");
        assert_eq!(parse_plain(&decode(line.as_bytes()).unwrap()).unwrap(), ("sam".into(), "secret pw".into()));
        assert_eq!(parse_plain(b"sam\0sam\0pw").unwrap().0, "sam");
        assert_eq!(parse_plain(b"boss\0sam\0pw"), Err(SaslError::AuthzidNotAllowed));
        assert_eq!(parse_plain(b"\0\0pw"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"sam\0pw"), Err(SaslError::Malformed));
        assert_eq!(decode(b"=").unwrap(), b"");
        assert_eq!(decode(b"!!!"), Err(SaslError::Base64));
    }
}
