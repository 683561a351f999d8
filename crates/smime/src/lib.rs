//! S/MIME on the send API (SPEC F8, issue 18): the certificates `postroom smime` keeps and the
//! checks that refuse unusable ones ([`cert`]), the store ([`table`]), and the messages `postroom
//! send --sign/--encrypt` makes ([`mime`]): multipart/signed with a detached SHA-256 CMS
//! signature, and application/pkcs7-mime enveloped-data with AES-256-CBC for every recipient
//! and the sender. CMS is OpenSSL's, through the `openssl` crate (README "S/MIME" says why).

pub mod cert;
pub mod mime;
pub mod table;

pub use cert::{Certificate, Identity, Purpose};
pub use mime::protect;

#[derive(Debug, thiserror::Error)]
pub enum SmimeError {
    /// A certificate or key that cannot serve; the text says why.
    #[error("{0}")]
    Unusable(String),
    #[error("no user {0} (see `postroom user list`)")]
    NoUser(String),
    #[error(
        "no S/MIME certificate for recipient {0}: the message was not sent (never in plain text); add one with \
         `postroom smime add-recipient {0} --cert FILE`, or leave out --encrypt"
    )]
    NoCertificate(String),
    #[error(
        "no S/MIME certificate and key to sign mail from {0}: import the certificate of the user who owns it with \
         `postroom smime import USER --cert FILE --key FILE`"
    )]
    NoSigner(String),
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("certificate store: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl SmimeError {
    /// An unusable certificate's reason, prefixed with whose it is.
    pub fn about(self, whose: &str) -> SmimeError {
        match self {
            SmimeError::Unusable(why) => SmimeError::Unusable(format!("{whose}: {why}")),
            other => other,
        }
    }
}

#[cfg(test)]
mod testkit;
