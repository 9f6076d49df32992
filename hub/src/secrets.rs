//! Encryption of secret fields at rest (AES-256-GCM with a rotating keyring).
