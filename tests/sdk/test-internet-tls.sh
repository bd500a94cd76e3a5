#!/usr/bin/env bash
# The test internet's HTTPS (tests/sdk/run.sh, tests/sdk/bench.sh): a CA of its own in DIR/ca.pem,
# which the server's egress proxy is told to trust for the real hosts behind network rules
# (--egress-ca), and DIR/server.{pem,key}, a certificate for a.test and b.test signed by it.
set -euo pipefail
dir="$1"
mkdir -p "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
{
    openssl req -x509 "${ec[@]}" -days 30 -subj "/CN=Alcove test internet CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem"
    openssl req "${ec[@]}" -subj "/CN=a.test" -keyout "$dir/server.key" -out "$dir/server.csr"
    printf 'subjectAltName=DNS:a.test,DNS:b.test\n' >"$dir/san.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 30 -extfile "$dir/san.ext" -out "$dir/server.pem"
} 2>"$dir/openssl.err" || { cat "$dir/openssl.err" >&2; exit 1; }
