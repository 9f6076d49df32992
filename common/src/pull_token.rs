//! Tenant-scoped pull tokens for the mirror: minted by the hub with its CA
//! key, checked by the agent offline with the CA certificate it already
//! holds, so a node can pull with the hub down.
//!
//! A token is `imgfleet1.<claims>.<signature>` (base64url, no padding): the
//! claims are JSON `{cluster, namespace, iat, exp}`, the signature is the CA
//! key's over `imgfleet-pull-token-v1\n` and the encoded claims, a prefix no
//! certificate or other signed object starts with. Only ECDSA P-256 CA keys
//! (the kind the hub generates) sign tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{KeyPair, SigningKey as _};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "imgfleet1";
const DOMAIN: &[u8] = b"imgfleet-pull-token-v1\n";

/// What a token grants: pulls of `namespace`'s repositories from `cluster`'s
/// mirror, from `iat` until `exp` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub cluster: String,
    pub namespace: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a token was not minted or not accepted. The messages never quote the
/// token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the CA key cannot sign pull tokens: {0}")]
    Key(String),
    #[error("the CA certificate cannot check pull tokens: {0}")]
    CaCertificate(String),
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("for another cluster")]
    OtherCluster,
}

/// Signs `claims` with the CA key (PEM).
pub fn mint(ca_key_pem: &str, claims: &Claims) -> Result<String, TokenError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(|e| TokenError::Key(e.to_string()))?;
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(TokenError::Key("expected an ECDSA P-256 key".into()));
    }
    let body = URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(claims).map_err(|e| TokenError::Key(e.to_string()))?);
    let sig = key
        .sign(&[DOMAIN, body.as_bytes()].concat())
        .map_err(|e| TokenError::Key(e.to_string()))?;
    Ok(format!("{PREFIX}.{body}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// Checks tokens offline against the CA certificate.
#[derive(Clone)]
pub struct Verifier {
    /// The CA's public key (an uncompressed P-256 point).
    public_key: Vec<u8>,
    cluster: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens of `cluster` signed by the CA of `ca_pem`.
    pub fn new(ca_pem: &str, cluster: &str) -> Result<Verifier, TokenError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
            .map_err(|e| TokenError::CaCertificate(e.to_string()))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| TokenError::CaCertificate(e.to_string()))?;
        Ok(Verifier {
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            cluster: cluster.to_owned(),
        })
    }

    /// The claims of a valid token for this cluster at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        let message = [DOMAIN, body.as_bytes()].concat();
        let provider = rustls::crypto::ring::default_provider();
        let valid = provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .filter(|(scheme, _)| *scheme == rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .flat_map(|(_, algs)| algs.iter())
            .any(|alg| {
                alg.verify_signature(&self.public_key, &message, &sig)
                    .is_ok()
            });
        if !valid {
            return Err(TokenError::Signature);
        }
        let claims: Claims = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(body)
                .map_err(|_| TokenError::Malformed)?,
        )
        .map_err(|_| TokenError::Malformed)?;
        if claims.cluster != self.cluster {
            return Err(TokenError::OtherCluster);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    #[test]
    fn minted_tokens_verify_and_nothing_else_does() {
        let ca = CertificateAuthority::generate().expect("ca");
        let claims = Claims {
            cluster: "edge-1".into(),
            namespace: "team-a".into(),
            iat: 100,
            exp: 200,
        };
        let token = mint(ca.key_pem(), &claims).expect("mint");
        let v = Verifier::new(ca.cert_pem(), "edge-1").expect("verifier");
        assert_eq!(v.verify(&token, 150).expect("valid"), claims);
        assert!(matches!(v.verify(&token, 200), Err(TokenError::Expired)));
        let other = Verifier::new(ca.cert_pem(), "edge-2").expect("verifier");
        assert!(matches!(
            other.verify(&token, 150),
            Err(TokenError::OtherCluster)
        ));
        // Another CA's token, a changed namespace, junk.
        let ca2 = CertificateAuthority::generate().expect("ca2");
        let foreign = mint(ca2.key_pem(), &claims).expect("mint");
        assert!(matches!(
            v.verify(&foreign, 150),
            Err(TokenError::Signature)
        ));
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = Claims {
            namespace: "team-b".into(),
            ..claims
        };
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
        let forged = format!("{}.{forged_body}.{}", parts[0], parts[2]);
        assert!(matches!(v.verify(&forged, 150), Err(TokenError::Signature)));
        for junk in ["", "imgfleet1", "imgfleet1.a.b.c", "x.y.z"] {
            assert!(v.verify(junk, 150).is_err(), "{junk}");
        }
    }
}
