#!/usr/bin/env bash
# Certificates for a Dask cluster that only accepts holders of a certificate from its own CA.
#
#   bash scripts/make_tls_certs.sh DIR [DAYS]        (default DAYS=365; needs the `openssl` command)
#
# Writes, in DIR (created; refuses to overwrite an existing ca.pem):
#   ca.pem                    the cluster's CA certificate: every process gets it (--tls-ca-file)
#   ca-key.pem                the CA's private key: only needed to sign more certificates.
#                             Move it off the cluster (or delete it: then rerun this script to rotate)
#   cluster.pem, cluster-key.pem   scheduler and workers (--tls-cert / --tls-key); serverAuth + clientAuth,
#                             since workers both listen and connect
#   client.pem, client-key.pem     the driver, `ctprep build-shards --scheduler tls://...`
#
# Dask checks that the peer's certificate chains to ca.pem and nothing else (no hostname check, no
# role check): whoever holds ANY key signed by this CA may submit code to the cluster. Treat every
# *-key.pem as a password. See docs/cluster-security.md.
set -euo pipefail
DIR=${1:?usage: make_tls_certs.sh DIR [DAYS]}
DAYS=${2:-365}
command -v openssl >/dev/null || { echo "make_tls_certs.sh: the openssl command is not installed" >&2; exit 1; }
umask 077  # a new DIR and the private keys: readable by their owner only
mkdir -p "$DIR"
if [[ -e $DIR/ca.pem ]]; then
    echo "make_tls_certs.sh: $DIR/ca.pem exists; not overwriting a CA (use a new folder to rotate)" >&2
    exit 1
fi
TMP=$(mktemp -d "$DIR/.tls-tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# P-256 ECDSA: fast to make and to handshake, supported by every OpenSSL Python links against.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

new_key "$TMP/ca-key.pem"
cat > "$TMP/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
openssl req -x509 -new -key "$TMP/ca-key.pem" -days "$DAYS" -sha256 -subj "/CN=ctprep-dask-ca" \
    -extensions v3_ca -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\n'; cat "$TMP/ca.ext") \
    -out "$TMP/ca.pem"

# sign NAME CN EXTENDED_KEY_USAGE
sign() {
    new_key "$TMP/$1-key.pem"
    openssl req -new -key "$TMP/$1-key.pem" -subj "/CN=$2" -out "$TMP/$1.csr"
    cat > "$TMP/$1.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = $3
subjectAltName = DNS:$2, DNS:localhost, IP:127.0.0.1
authorityKeyIdentifier = keyid
EOF
    openssl x509 -req -in "$TMP/$1.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca-key.pem" -CAcreateserial \
        -days "$DAYS" -sha256 -extfile "$TMP/$1.ext" -out "$TMP/$1.pem" 2>/dev/null
}
sign cluster ctprep-dask-cluster "serverAuth, clientAuth"
sign client ctprep-dask-client "clientAuth"

for f in ca.pem cluster.pem client.pem; do chmod 644 "$TMP/$f"; done
mv "$TMP"/ca.pem "$TMP"/ca-key.pem "$TMP"/cluster.pem "$TMP"/cluster-key.pem \
   "$TMP"/client.pem "$TMP"/client-key.pem "$DIR"/
echo "TLS certificates in $DIR: ca.pem, cluster.pem + cluster-key.pem (scheduler, workers)," \
     "client.pem + client-key.pem (ctprep build-shards); ca-key.pem signs more: keep it off the cluster" >&2
