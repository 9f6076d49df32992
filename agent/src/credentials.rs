//! The agent's credentials directory across renewals: a renewed key and
//! certificate replace the old pair without a moment where a crash leaves a
//! key that does not match its certificate.
//!
//! The pair is written as `key.pem.next` then `cert.pem.next` (each fsynced
//! and renamed into place by [`imgfleet_common::pki`]), then renamed over
//! `key.pem` and `cert.pem` in that order. `cert.pem.next` exists only once
//! its key is safe, so [`recover`] at start finishes a renewal a crash cut
//! short (rename the rest), and drops a lone `key.pem.next` whose certificate
//! never arrived.

use std::path::Path;

use imgfleet_common::pki::{self, PkiError};
use imgfleet_common::tls::{CERT_FILE, KEY_FILE};

const NEXT: &str = ".next";

fn next(dir: &Path, file: &str) -> std::path::PathBuf {
    dir.join(format!("{file}{NEXT}"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Replaces the key and certificate in `dir` with a renewed pair.
pub fn store_renewed(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    pki::write_private_file(&next(dir, KEY_FILE), key_pem)?;
    pki::write_public_file(&next(dir, CERT_FILE), cert_pem)?;
    finish(dir)
}

fn finish(dir: &Path) -> Result<(), PkiError> {
    for file in [KEY_FILE, CERT_FILE] {
        let from = next(dir, file);
        if from.exists() {
            let to = dir.join(file);
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
    }
    sync_dir(dir)
}

/// Finishes or drops a renewal a crash interrupted; call before loading
/// the credentials.
pub fn recover(dir: &Path) -> Result<(), PkiError> {
    if next(dir, CERT_FILE).exists() {
        return finish(dir);
    }
    let lone_key = next(dir, KEY_FILE);
    if lone_key.exists() {
        std::fs::remove_file(&lone_key).map_err(io(&lone_key))?;
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_renewal_is_finished_or_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join(KEY_FILE), "old key").expect("write");
        std::fs::write(d.join(CERT_FILE), "old cert").expect("write");

        // Crash after the key was renamed, before the certificate.
        pki::write_private_file(&next(d, KEY_FILE), "new key").expect("key");
        pki::write_public_file(&next(d, CERT_FILE), "new cert").expect("cert");
        std::fs::rename(next(d, KEY_FILE), d.join(KEY_FILE)).expect("rename");
        recover(d).expect("recover");
        assert_eq!(
            std::fs::read_to_string(d.join(KEY_FILE)).unwrap(),
            "new key"
        );
        assert_eq!(
            std::fs::read_to_string(d.join(CERT_FILE)).unwrap(),
            "new cert"
        );

        // Crash before the certificate was written: the old pair stays.
        pki::write_private_file(&next(d, KEY_FILE), "newer key").expect("key");
        recover(d).expect("recover");
        assert!(!next(d, KEY_FILE).exists());
        assert_eq!(
            std::fs::read_to_string(d.join(KEY_FILE)).unwrap(),
            "new key"
        );

        store_renewed(d, "cert 3", "key 3").expect("store");
        assert_eq!(std::fs::read_to_string(d.join(KEY_FILE)).unwrap(), "key 3");
        assert_eq!(
            std::fs::read_to_string(d.join(CERT_FILE)).unwrap(),
            "cert 3"
        );
    }
}
