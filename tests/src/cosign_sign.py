#!/usr/bin/env python3
"""Cosign-format test keys and signatures, with PyPI's `cryptography`.

usage: cosign_sign.py keygen PRIVATE_PEM_OUT      prints the public key (PEM, SubjectPublicKeyInfo)
       cosign_sign.py sign PRIVATE_PEM PAYLOAD     prints base64(DER ECDSA P-256 over SHA-256)

This is what `cosign generate-key-pair` and `cosign sign --key` produce for the
`dev.cosignproject.cosign/signature` annotation (no cosign binary installs here).
"""
import base64, sys

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
except ImportError:
    sys.stderr.write("PyPI's cryptography is missing: python3 -m pip install cryptography "
                     "(or bash scripts/install-deps.sh)\n")
    sys.exit(3)


def main():
    a = sys.argv[1:]
    if a[:1] == ["keygen"] and len(a) == 2:
        key = ec.generate_private_key(ec.SECP256R1())
        with open(a[1], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        sys.stdout.write(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    elif a[:1] == ["sign"] and len(a) == 3:
        with open(a[1], "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(a[2], "rb") as f:
            payload = f.read()
        sys.stdout.write(base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode())
    else:
        raise SystemExit(__doc__)


main()
